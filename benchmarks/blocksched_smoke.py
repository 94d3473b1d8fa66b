"""GPU smoke test of live slicing: does the agent's sliced launch give the same results?

    python3 benchmarks/blocksched_smoke.py prepare DIR    # PTX image, slice cubin, plan (no agent)
    tally run --priority high -- python3 benchmarks/blocksched_smoke.py hp SECONDS &
    TALLY_BLOCKSCHED_PLAN=DIR/plan tally run --priority best-effort --stats-dir DIR/stats -- \
        python3 benchmarks/blocksched_smoke.py be DIR TAG

`mark` writes one word per block that depends on its block index and the grid,
so a slice that ran the wrong blocks, or saw the wrong %nctaid, changes the
output. The BE process loads the PTX with cuModuleLoadData (the agent hashes
the image and finds it in the plan), launches a 2-D grid several times, and
compares each launch's output with the expected words. It writes
DIR/be-TAG.json: per launch, wall time (launch to synchronize) and mismatches.
"""
from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

from tally import files
from tally.bench.micro import Driver, load_nvrtc

SOURCE = r"""
extern "C" __global__ void mark(unsigned* out, int iters) {
  unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  float a = threadIdx.x * 0.001f;
  for (int i = 0; i < iters; i++) a = a * 1.0000001f + 0.5f;
  if (threadIdx.x == 0) out[b] = (b * 2654435761u) ^ (gridDim.x * 7u + gridDim.y * 13u + gridDim.z * 17u) ^ (a == 12345.f);
}
extern "C" __global__ void tiny(unsigned* out) { if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x; }
"""
GRID = (1056, 16, 1)  # 16 waves of 256-thread blocks on a 132-SM Hopper
THREADS = 256
ITERS = 2500


def ptx(arch: str) -> bytes:
    nvrtc = load_nvrtc()
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"mark.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * 1)(f"--gpu-architecture=compute_{arch[3:]}".encode())
    rc = nvrtc.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    if rc != 0:
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise SystemExit(f"NVRTC failed: {log.value.decode()}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    text = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, text)
    return text.raw.rstrip(b"\0")


def context():
    drv = Driver()
    drv.cuInit(0)
    dev = ctypes.c_int()
    drv.cuDeviceGet(ctypes.byref(dev), 0)
    ctx = ctypes.c_void_p()
    drv.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    drv.cuCtxSetCurrent(ctx)
    return drv, drv.arch(dev)


def prepare(out: Path) -> None:
    from tally.blocksched.cache import KernelCache, compiled_module

    _, arch = context()
    image = ptx(arch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mark.ptx").write_bytes(image)
    cubin, _ = compiled_module(image.decode(), "mark", "slice", arch, KernelCache(out / "cache"))
    cubin_path = out / f"{files.fnv1a64(cubin):016x}.cubin"
    cubin_path.write_bytes(cubin)
    (out / "plan").write_text("tally-blocksched-plan 1\n"
                              f"slice {files.fnv1a64(image):016x} mark 2 {files.fnv1a64(cubin):016x} "
                              f"{cubin_path.resolve()}\n")
    print(f"prepared {arch}: PTX {len(image)} B, slice cubin {len(cubin)} B")


def load(drv, image: bytes):
    module, f = ctypes.c_void_p(), ctypes.c_void_p()
    drv.cuModuleLoadData(ctypes.byref(module), image + b"\0")
    return module, f


def hp(seconds: float) -> None:
    drv, arch = context()
    module, f = load(drv, ptx(arch))
    drv.cuModuleGetFunction(ctypes.byref(f), module, b"tiny")
    buf = ctypes.c_uint64()
    drv.cuMemAlloc_v2(ctypes.byref(buf), 4096)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(buf), ctypes.c_void_p))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        drv.cuLaunchKernel(f, 8, 1, 1, 32, 1, 1, 0, None, params, None)
        drv.cuCtxSynchronize()
        time.sleep(0.002)


def be(out: Path, tag: str, launches: int = 12) -> None:
    drv, arch = context()
    image = (out / "mark.ptx").read_bytes()
    module, f = load(drv, image)
    drv.cuModuleGetFunction(ctypes.byref(f), module, b"mark")
    total = GRID[0] * GRID[1] * GRID[2]
    buf = ctypes.c_uint64()
    drv.cuMemAlloc_v2(ctypes.byref(buf), 4 * total)
    iters = ctypes.c_int(ITERS)
    params = (ctypes.c_void_p * 2)(ctypes.cast(ctypes.byref(buf), ctypes.c_void_p),
                                   ctypes.cast(ctypes.byref(iters), ctypes.c_void_p))
    b = np.arange(total, dtype=np.uint64)
    expected = ((b * 2654435761) & 0xFFFFFFFF).astype(np.uint32) ^ np.uint32(GRID[0] * 7 + GRID[1] * 13 + GRID[2] * 17)
    host = np.zeros(total, dtype=np.uint32)
    drv.lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
    drv.lib.cuMemsetD32_v2.argtypes = [ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t]
    results = []
    for i in range(launches):
        drv.cuMemsetD32_v2(buf.value, 0xDEADBEEF, total)
        drv.cuCtxSynchronize()
        t0 = time.perf_counter()
        drv.cuLaunchKernel(f, GRID[0], GRID[1], GRID[2], THREADS, 1, 1, 0, None, params, None)
        drv.cuCtxSynchronize()
        t1 = time.perf_counter()
        drv.cuMemcpyDtoH_v2(host.ctypes.data, buf.value, 4 * total)
        results.append({"launch": i, "ms": (t1 - t0) * 1e3, "mismatches": int(np.count_nonzero(host != expected))})
    try:
        from tally.agent import counters
        c = counters()
        agent = dict(vars(c)) if hasattr(c, "__dict__") else list(c)
    except Exception as exc:  # the counters are informative only
        agent = repr(exc)
    report = {"tag": tag, "arch": arch, "grid": GRID, "threads": THREADS, "iters": ITERS, "launches": results,
              "agent": agent}
    (out / f"be-{tag}.json").write_text(json.dumps(report, indent=1))
    bad = sum(r["mismatches"] for r in results)
    print(f"be {tag}: {launches} launches, median {sorted(r['ms'] for r in results)[launches // 2]:.3f} ms, "
          f"mismatched words {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "prepare":
        prepare(Path(sys.argv[2]))
    elif what == "hp":
        hp(float(sys.argv[2]))
    else:
        be(Path(sys.argv[2]), sys.argv[3])
