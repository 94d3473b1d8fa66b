#!/usr/bin/env bash
# Live slicing on a GPU, end to end through the CLI (about 1 minute):
#   source benchmarks/gpu_env.sh && bash benchmarks/blocksched_smoke.sh OUTDIR
# An HP client keeps launching small kernels; a BE client launches a 2-D grid
# 12 times, first without a plan (whole kernels), then with one (slices), and
# checks every output word (benchmarks/blocksched_smoke.py).
set -u
out=${1:-/tmp/blocksched-smoke}; mkdir -p "$out"
export TALLY_RUNTIME_DIR=${TALLY_RUNTIME_DIR:-/tmp/tally-smoke-rt} TALLY_CACHE_DIR=$out/cache PYTHONUNBUFFERED=1
tally() { python3 -m tally "$@"; }
cleanup() { tally down --force >/dev/null 2>&1; }
trap cleanup EXIT
python3 benchmarks/blocksched_smoke.py prepare "$out/s" || exit 1
tally up --metrics-port 0 || exit 1
tally run --priority high -- python3 benchmarks/blocksched_smoke.py hp 40 &
hp=$!
sleep 3
rc=0
tally run --priority best-effort --stats-dir "$out/stats-whole" -- \
    python3 benchmarks/blocksched_smoke.py be "$out/s" whole || rc=1
TALLY_BLOCKSCHED_PLAN=$out/s/plan tally run --priority best-effort --stats-dir "$out/stats-sliced" -- \
    python3 benchmarks/blocksched_smoke.py be "$out/s" sliced || rc=1
kill $hp 2>/dev/null; wait $hp 2>/dev/null
python3 -m tally blocksched show --live "$out/stats-sliced"
cat "$out"/stats-sliced/*.json 2>/dev/null | python3 -c "import json,sys; [print(json.dumps(json.loads(l).get('blocksched'))) for l in sys.stdin if l.strip()]"
exit $rc
