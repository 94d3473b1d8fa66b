#!/usr/bin/env bash
# Issue 5 on a GPU: which code images does the agent save from real programs,
# and how many kernels can `tally blocksched prepare` transform from them?
#   source benchmarks/gpu_env.sh && bash benchmarks/module_capture_check.sh OUTDIR
# One program per kind of kernel source; each runs under `tally run --save-modules`
# with its own module dir; then `tally blocksched prepare --json` over that dir.
set -u
out=${1:-/tmp/module_capture}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TALLY_CACHE_DIR=$out/cache TRITON_CACHE_DIR=$out/triton-cache
export TORCHINDUCTOR_CACHE_DIR=$out/inductor-cache

cat > /tmp/mc_cupy.py <<'PY'
import cupy as cp
k = cp.RawKernel(r'extern "C" __global__ void scale(float* x, float a, int n)'
                 r'{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a; }', "scale")
x = cp.ones(1 << 20, dtype=cp.float32); k(((1 << 20) // 256,), (256,), (x, cp.float32(2), cp.int32(1 << 20)))
assert float(x.sum()) == 2 * (1 << 20); print("cupy ok")
PY
cat > /tmp/mc_triton.py <<'PY'
import torch, triton, triton.language as tl
@triton.jit
def add(x, y, o, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B); m = i < n
    tl.store(o + i, tl.load(x + i, mask=m) + tl.load(y + i, mask=m), mask=m)
a = torch.randn(1 << 20, device="cuda"); b = torch.randn_like(a); c = torch.empty_like(a)
add[(triton.cdiv(a.numel(), 1024),)](a, b, c, a.numel(), B=1024); torch.cuda.synchronize()
assert torch.allclose(c, a + b); print("triton ok")
PY
cat > /tmp/mc_compile.py <<'PY'
import torch
m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.LayerNorm(512)).cuda()
f = torch.compile(m); x = torch.randn(64, 512, device="cuda")
for _ in range(3): f(x).sum().backward()
torch.cuda.synchronize(); print("compile ok")
PY
cat > /tmp/mc_eager.py <<'PY'
import torch
m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10)).cuda()
x = torch.randn(8, 3, 32, 32, device="cuda")
for _ in range(3): m(x).sum().backward()
torch.cuda.synchronize(); print("eager ok")
PY
# A step that hangs is stopped with SIGABRT so that faulthandler prints where it was.
export PYTHONFAULTHANDLER=1
for prog in ${MC_PROGRAMS:-cupy triton compile eager}; do
    dir=$out/modules-$prog
    TALLY_MODULE_DIR=$dir timeout -s ABRT 120 python3 -m tally run -- python3 /tmp/mc_$prog.py > "$out/$prog.log" 2>&1
    echo "$prog rc=$? images=$(ls "$dir" 2>/dev/null | grep -c '\.img$') bytes=$(du -sb "$dir" 2>/dev/null | cut -f1)"
    start=$(date +%s.%N)
    timeout -s ABRT ${MC_PREPARE_TIMEOUT:-60} python3 -m tally blocksched prepare --modules "$dir" --compile sm_90 --json \
        > "$out/prepare-$prog.json" 2> "$out/prepare-$prog.err"
    echo "  prepare rc=$? in $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
    python3 - "$out/prepare-$prog.json" <<'PY'
import collections, json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"  no report: {exc}"); sys.exit(0)
print("  summary:", report["summary"])
kinds = collections.Counter((i.get("kind"), i.get("reason")) for i in report["images"])
for (kind, reason), n in kinds.most_common():
    print(f"  {n} x {kind}: {reason or 'PTX found'}")
PY
done
