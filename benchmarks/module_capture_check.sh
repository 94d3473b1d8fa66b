#!/usr/bin/env bash
# Issue 5 on a GPU: which code images does the agent save from real programs,
# and how many kernels can `tally blocksched prepare` transform from them?
#   source benchmarks/gpu_env.sh && bash benchmarks/module_capture_check.sh OUTDIR
# One program per kind of kernel source; each runs under `tally run --save-modules`
# with its own module dir; then `tally blocksched prepare --compile sm_90 --modes
# slice --json` over that dir writes a plan for it. With MC_LIVE=1, each program
# then runs again as a best-effort client under `tally run --block-level` next to
# a high-priority client, so its planned kernels run sliced: the program checks
# its own results, and the agent's counters say how much ran sliced.
set -u
out=${1:-/tmp/module_capture}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TALLY_CACHE_DIR=$out/cache TRITON_CACHE_DIR=$out/triton-cache
export TORCHINDUCTOR_CACHE_DIR=$out/inductor-cache

cat > /tmp/mc_cupy.py <<'PY'
import cupy as cp
k = cp.RawKernel(r'extern "C" __global__ void scale(float* x, float a, int n)'
                 r'{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a; }', "scale")
n = 1 << 24
x = cp.ones(n, dtype=cp.float32); k((n // 256,), (256,), (x, cp.float32(2), cp.int32(n)))
assert float(x.sum()) == 2 * n; print("cupy ok")
PY
cat > /tmp/mc_triton.py <<'PY'
import torch, triton, triton.language as tl
@triton.jit
def add(x, y, o, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B); m = i < n
    tl.store(o + i, tl.load(x + i, mask=m) + tl.load(y + i, mask=m), mask=m)
a = torch.randn(1 << 24, device="cuda"); b = torch.randn_like(a); c = torch.empty_like(a)
add[(triton.cdiv(a.numel(), 1024),)](a, b, c, a.numel(), B=1024); torch.cuda.synchronize()
assert torch.allclose(c, a + b); print("triton ok")
PY
cat > /tmp/mc_compile.py <<'PY'
import torch
m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.LayerNorm(512)).cuda()
f = torch.compile(m); x = torch.randn(16384, 512, device="cuda")
for _ in range(3): f(x).sum().backward()
with torch.no_grad():
    assert torch.allclose(f(x), m(x), atol=1e-4, rtol=1e-4)
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
    timeout -s ABRT ${MC_PREPARE_TIMEOUT:-60} python3 -m tally blocksched prepare --modules "$dir" --compile sm_90 \
        --modes slice --plan "$out/plan-$prog" --json \
        > "$out/prepare-$prog.json" 2> "$out/prepare-$prog.err"
    echo "  prepare rc=$? in $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
    # which cubins Triton and Inductor cached (an ELF image is matched to its PTX by these)
    find "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" -name '*.cubin' -printf '%s %p\n' 2>/dev/null | sort \
        > "$out/cached-cubins-$prog.txt"
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

[ "${MC_LIVE:-0}" = 1 ] || exit 0
export TALLY_RUNTIME_DIR=/tmp/tally-mc-rt
hp=
cleanup() { [ -n "$hp" ] && kill "$hp" 2>/dev/null; python3 -m tally down --force >/dev/null 2>&1; }
trap cleanup EXIT
python3 -m tally up --metrics-port 0 > "$out/up.log" 2>&1 || { echo "tally up failed"; exit 1; }
python3 -m tally run --priority high -- python3 benchmarks/blocksched_smoke.py hp 600 > "$out/hp.log" 2>&1 &
hp=$!
sleep 3
for prog in ${MC_PROGRAMS:-cupy triton compile eager}; do
    [ -s "$out/plan-$prog" ] || { echo "$prog: no plan"; continue; }
    timeout -s ABRT 150 python3 -m tally run --priority best-effort --block-level --plan "$out/plan-$prog" \
        --stats-dir "$out/stats-$prog" -- python3 /tmp/mc_$prog.py > "$out/live-$prog.log" 2>&1
    echo "$prog live rc=$? $(grep -c ' ok$' "$out/live-$prog.log") ok line(s)"
    python3 -m tally blocksched show --live "$out/stats-$prog" 2>&1 | head -12
    cat "$out"/stats-$prog/*.json 2>/dev/null | python3 -c "
import json, sys
for line in sys.stdin:
    b = json.loads(line).get('blocksched')
    if b and (b['sliced_launches'] or b['unsliced_launches']):
        print('  sliced', b['sliced_launches'], 'launches in', b['slices'], 'slices; whole', b['unsliced_launches'],
              '; est. sliced share', round(b['sliced_est_ns'] / max(1, b['sliced_est_ns'] + b['unsliced_est_ns']), 3))
        for k in b['kernels'][:6]: print('   ', k['entry'][:60], k['sliced_launches'], k['slices'], k['whole_launches'], k['reason'])
"
done
