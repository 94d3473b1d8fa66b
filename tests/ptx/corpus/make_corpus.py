"""Regenerate the PTX corpus and its launch manifest.

    python3 -m venv /tmp/tritonenv && /tmp/tritonenv/bin/pip install triton numpy
    /tmp/tritonenv/bin/python tests/ptx/corpus/make_corpus.py [--skip-cuda] [--skip-triton]

* cuda/*.cu  -> cuda/*.ptx with `nvcc -ptx -arch=sm_90` (-rdc=true for dynamic parallelism)
* Triton kernels below -> triton/<name>.ptx, compiled for GPUTarget("cuda", 90, 32)
  without a GPU, at PTX ISA 8.7 so that CUDA 12.8+ drivers and ptxas JIT them.
* manifest.json: per corpus kernel, how to launch it for the bit-exactness
  check (benchmarks/ptx_gpu_check.py) and which transformations must refuse it.

Parameter kinds in the manifest (one per PTX parameter, in order):
  input   {dtype, count}  random contents, read only
  inout   {dtype, count}  random contents, read and written: compared after the run
  output  {dtype, count}  poisoned (0xFF bytes) before the run, compared after
  zeros   {dtype, count}  zeroed once before each logical run (all launches of a
                          sliced/preempted run share it), compared after
  scalar  {dtype, value}
  (dtype "int8as32" is int32 holding values in [-128, 127], to keep integer sums small)
  null    a null pointer (Triton's scratch pointers when no scratch is needed)
Every kernel's outputs are a deterministic function of its inputs (no float
atomics; the chained scan uses integer sums), so outputs compare bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PTX_VERSION = 87

P = {"slice": None, "ptb": None, "preemptible": None}


def refused_all(reason: str) -> dict:
    return {"slice": reason, "ptb": reason, "preemptible": reason}


def refused_loop(reason: str) -> dict:
    return {"slice": None, "ptb": reason, "preemptible": reason}


def inp(dtype, count):
    return {"kind": "input", "dtype": dtype, "count": count}


def out(dtype, count):
    return {"kind": "output", "dtype": dtype, "count": count}


def inout(dtype, count):
    return {"kind": "inout", "dtype": dtype, "count": count}


def zeros(dtype, count):
    return {"kind": "zeros", "dtype": dtype, "count": count}


def scalar(dtype, value):
    return {"kind": "scalar", "dtype": dtype, "value": value}


NULL = {"kind": "null"}

# --------------------------------------------------------------------------- CUDA
N1 = 1 << 20
CUDA_KERNELS = [
    # module, entry, grid, block, dynamic shared bytes, params, expected refusals
    ("cuda/elementwise.ptx", "saxpy", [4097, 1, 1], [256, 1, 1], 0,
     [inp("float32", N1 + 100), inout("float32", N1 + 100), scalar("float32", 1.5), scalar("int32", N1 + 100)], P),
    ("cuda/elementwise.ptx", "grid_ids_3d", [7, 5, 3], [4, 2, 2], 0, [out("uint32", 7 * 5 * 3 * 16 * 6)], P),
    ("cuda/elementwise.ptx", "add_2d", [40, 33, 1], [32, 8, 1], 0,
     [inp("float32", 1250 * 260), inp("float32", 1250 * 260), out("float32", 1250 * 260),
      scalar("int32", 1250), scalar("int32", 260)], P),
    ("cuda/elementwise.ptx", "exit_early", [1000, 1, 1], [128, 1, 1], 0,
     [inp("int32", 127_900), out("int32", 128_000), scalar("int32", 127_900)], P),
    ("cuda/barriers.ptx", "block_sum", [2000, 1, 1], [256, 1, 1], 0,
     [inp("int32", 511_900), out("int32", 2000), scalar("int32", 511_900)], P),
    ("cuda/barriers.ptx", "early_return_then_sync", [500, 3, 1], [128, 1, 1], 0,
     [inp("int32", 500 * 128), out("int32", 500 * 128 * 3), scalar("int32", 64)], P),
    ("cuda/barriers.ptx", "matmul_tiled", [20, 20, 1], [16, 16, 1], 0,
     [inp("int8as32", 310 * 310), inp("int8as32", 310 * 310), out("int32", 310 * 310), scalar("int32", 310)], P),
    ("cuda/barriers.ptx", "reverse_dynamic_smem", [60, 7, 1], [8, 4, 4], 128 * 4,
     [inp("float32", 60 * 7 * 128), out("float32", 60 * 7 * 128)], P),
    ("cuda/barriers.ptx", "async_copy_shift", [3000, 1, 1], [128, 1, 1], 0,
     [inp("float32", 3000 * 128), out("float32", 3000 * 128)], P),
    ("cuda/barriers.ptx", "bounded_square", [2049, 1, 1], [256, 1, 1], 0,
     [inp("float32", N1 // 2), out("float32", N1 // 2), scalar("int32", N1 // 2)], P),
    ("cuda/barriers.ptx", "limited_registers", [2049, 1, 1], [256, 1, 1], 0,
     [inp("float32", N1 // 2), out("float32", N1 // 2), scalar("int32", N1 // 2)], P),
    ("cuda/ordered.ptx", "chained_scan", [1500, 1, 1], [256, 1, 1], 0,
     [inp("int8as32", 1500 * 256), out("int32", 1500 * 256), zeros("int32", 1500), zeros("uint32", 1500)], P),
    ("cuda/refused.ptx", "grid_sync", None, None, 0, [], refused_all("grid-wide sync or cooperative launch")),
    ("cuda/refused.ptx", "cluster_exchange", None, None, 0, [], refused_all("thread-block clusters")),
    ("cuda/refused.ptx", "sm_id", None, None, 0, [], refused_all("SM-dependent logic")),
    ("cuda/refused.ptx", "syncthreads_count", [900, 1, 1], [256, 1, 1], 0,
     [inp("int8as32", 900 * 256), out("int32", 900)], refused_loop("barrier form bar.red.popc")),
    ("cuda/refused.ptx", "named_barrier", [900, 1, 1], [128, 1, 1], 0,
     [inp("int32", 900 * 64), out("int32", 900 * 64)], refused_loop("bar.sync with a thread count")),
    ("cuda/refused.ptx", "ctaid_in_callee", None, None, 0, [], refused_all("reads %ctaid.x in called function")),
    # grid None: not launched by the GPU check (its module needs linking with cudadevrt to load)
    ("cuda/dynamic_parallelism.ptx", "child", None, None, 0, [], P),
    ("cuda/dynamic_parallelism.ptx", "parent", None, None, 0, [], refused_all("dynamic parallelism")),
]


def compile_cuda() -> None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    for source in sorted((HERE / "cuda").glob("*.cu")):
        extra = ["-rdc=true"] if source.stem == "dynamic_parallelism" else []
        target = source.with_suffix(".ptx")
        subprocess.run([nvcc, "-ptx", "-arch=sm_90", *extra, str(source), "-o", str(target)], check=True)
        print(f"wrote {target.relative_to(HERE)}")


# ------------------------------------------------------------------------- Triton
def triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def elementwise_gelu(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
        z = x * y
        tl.store(out_ptr + offs, 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476)), mask=mask)

    @triton.jit
    def softmax_rows(x_ptr, out_ptr, n_cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=-float("inf"))
        x = x - tl.max(x, axis=0)
        e = tl.exp(x)
        tl.store(out_ptr + row * stride + cols, e / tl.sum(e, axis=0), mask=mask)

    @triton.jit
    def layer_norm_rows(x_ptr, w_ptr, b_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        mean = tl.sum(x, axis=0) / n_cols
        d = tl.where(mask, x - mean, 0.0)
        var = tl.sum(d * d, axis=0) / n_cols
        w = tl.load(w_ptr + cols, mask=mask)
        b = tl.load(b_ptr + cols, mask=mask)
        tl.store(out_ptr + row * n_cols + cols, d * tl.rsqrt(var + eps) * w + b, mask=mask)

    @triton.jit
    def matmul_fp16(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :],
                        mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
            b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :],
                        mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, seq, scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # one program per (query block, batch*head); q/k/v/o are [BH, seq, D] contiguous
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        base = bh * seq * D
        rm = pid_m * BM + tl.arange(0, BM)
        rd = tl.arange(0, D)
        q = tl.load(q_ptr + base + rm[:, None] * D + rd[None, :], mask=rm[:, None] < seq, other=0.0)
        m_i = tl.full((BM,), -float("inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for start in range(0, seq, BN):
            rn = start + tl.arange(0, BN)
            k = tl.load(k_ptr + base + rn[:, None] * D + rd[None, :], mask=rn[:, None] < seq, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(rn[None, :] < seq, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + base + rn[:, None] * D + rd[None, :], mask=rn[:, None] < seq, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        tl.store(o_ptr + base + rm[:, None] * D + rd[None, :], acc / l_i[:, None], mask=rm[:, None] < seq)

    @triton.jit
    def sum_rows(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
        tl.store(out_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def max_cols_3d(x_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr):
        # grid (col blocks, 1 per matrix row-chunk, batch): column max over rows, 3-D program ids
        pid_c = tl.program_id(0)
        chunk = tl.program_id(1)
        batch = tl.program_id(2)
        c = pid_c * BLOCK + tl.arange(0, BLOCK)
        best = tl.full((BLOCK,), -float("inf"), tl.float32)
        for r in range(0, rows):
            v = tl.load(x_ptr + ((batch * tl.num_programs(1) + chunk) * rows + r) * cols + c, mask=c < cols,
                        other=-float("inf"))
            best = tl.maximum(best, v)
        tl.store(out_ptr + (batch * tl.num_programs(1) + chunk) * cols + c, best, mask=c < cols)

    seq, d, bh = 2000, 64, 16
    return [
        # name, fn, signature, constexprs, options, grid, params (excluding Triton's scratch pointers)
        ("elementwise_gelu", elementwise_gelu, {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
         {"BLOCK": 1024}, {"num_warps": 4}, [977, 1, 1],
         [inp("float32", 1_000_000), inp("float32", 1_000_000), out("float32", 1_000_000), scalar("int32", 1_000_000)]),
        ("softmax_rows", softmax_rows, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32", "stride": "i32"},
         {"BLOCK": 1024}, {"num_warps": 8}, [1800, 1, 1],
         [inp("float32", 1800 * 1000), out("float32", 1800 * 1000), scalar("int32", 1000), scalar("int32", 1000)]),
        ("layer_norm_rows", layer_norm_rows,
         {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32", "eps": "fp32"},
         {"BLOCK": 1024}, {"num_warps": 4}, [1500, 1, 1],
         [inp("float32", 1500 * 768), inp("float32", 768), inp("float32", 768), out("float32", 1500 * 768),
          scalar("int32", 768), scalar("float32", 1e-5)]),
        ("matmul_fp16", matmul_fp16,
         {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"},
         # large enough (68 GFLOP) that preemption latency is measured on a running kernel
         {"BM": 128, "BN": 128, "BK": 32}, {"num_warps": 4, "num_stages": 3}, [32, 32, 1],
         [inp("float16", 4096 * 2048), inp("float16", 2048 * 4096), out("float32", 4096 * 4096),
          scalar("int32", 4096), scalar("int32", 4096), scalar("int32", 2048)]),
        ("attention_fwd", attention_fwd,
         {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "o_ptr": "*fp32", "seq": "i32", "scale": "fp32"},
         {"D": d, "BM": 64, "BN": 64}, {"num_warps": 4, "num_stages": 2}, [(seq + 63) // 64, bh, 1],
         [inp("float16", bh * seq * d), inp("float16", bh * seq * d), inp("float16", bh * seq * d),
          out("float32", bh * seq * d), scalar("int32", seq), scalar("float32", 0.125)]),
        ("sum_rows", sum_rows, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32"},
         {"BLOCK": 512}, {"num_warps": 4}, [2500, 1, 1],
         [inp("float32", 2500 * 1300), out("float32", 2500), scalar("int32", 1300)]),
        ("max_cols_3d", max_cols_3d, {"x_ptr": "*fp32", "out_ptr": "*fp32", "rows": "i32", "cols": "i32"},
         {"BLOCK": 256}, {"num_warps": 2}, [3, 17, 5],
         [inp("float32", 5 * 17 * 40 * 700), out("float32", 5 * 17 * 700), scalar("int32", 40), scalar("int32", 700)]),
    ]


def compile_triton() -> list[dict]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    entries = []
    for name, fn, signature, constexprs, options, grid, params in triton_kernels():
        full_signature = dict(signature)
        full_signature.update({key: "constexpr" for key in constexprs})
        source = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options={**options, "ptx_version": PTX_VERSION})
        ptx = compiled.asm["ptx"]
        path = HERE / "triton" / f"{name}.ptx"
        path.write_text(ptx)
        meta = compiled.metadata
        # Triton appends its global- and profile-scratch pointers to every kernel.
        n_ptx_params = ptx.split(f".entry {meta.name}(", 1)[1].split(")", 1)[0].count(".param")
        padded = params + [NULL] * (n_ptx_params - len(params))
        if meta.global_scratch_size or meta.profile_scratch_size:
            raise SystemExit(f"{name}: needs scratch memory, which the manifest does not describe")
        entries.append({
            "module": f"triton/{name}.ptx", "entry": meta.name, "grid": grid,
            "block": [meta.num_warps * 32, 1, 1], "shared": meta.shared, "params": padded,
            "expect_refusal": P, "source": "triton " + triton.__version__,
        })
        print(f"wrote triton/{name}.ptx ({len(ptx)} bytes, shared {meta.shared}, warps {meta.num_warps})")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--skip-triton", action="store_true")
    args = parser.parse_args()
    manifest_path = HERE / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"kernels": []}
    if not args.skip_cuda:
        compile_cuda()
    cuda_entries = [
        {"module": module, "entry": entry, "grid": grid, "block": block, "shared": shared, "params": params,
         "expect_refusal": refusal, "source": "nvcc"}
        for module, entry, grid, block, shared, params, refusal in CUDA_KERNELS
    ]
    if args.skip_triton:
        triton_entries = [k for k in previous["kernels"] if k["module"].startswith("triton/")]
    else:
        triton_entries = compile_triton()
    manifest = {
        "about": "Launch descriptions of the PTX corpus; see make_corpus.py for the parameter kinds.",
        "kernels": cuda_entries + triton_entries,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote manifest.json ({len(manifest['kernels'])} kernels)")


if __name__ == "__main__":
    sys.exit(main())
