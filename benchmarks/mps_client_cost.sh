#!/usr/bin/env bash
# Does an idle second MPS client slow a high-priority job? HP service time
# (back-to-back requests, `tally.bench.worker --measure-capacity`) of one
# workload: plain process; under tally alone; under tally with a best-effort
# client that initialized CUDA, ran one kernel and sleeps (no GPU work).
#   source benchmarks/gpu_env.sh && bash benchmarks/mps_client_cost.sh OUTDIR [WORKLOAD]
set -u
out=${1:-/tmp/mps_client_cost}; workload=${2:-llama-decode}; mkdir -p "$out"
export TALLY_RUNTIME_DIR=$(mktemp -d /tmp/tmc-XXXX) PYTHONUNBUFFERED=1
tally() { python3 -m tally "$@"; }
idle=""
cleanup() { [ -n "$idle" ] && kill "$idle" 2>/dev/null; tally down --force >/dev/null 2>&1; rm -rf "$TALLY_RUNTIME_DIR"; }
trap cleanup EXIT
capacity() { python3 -m tally.bench.worker --workload "$workload" --role hp --measure-capacity --capacity-s 4 \
    --warmup-s 1 --result "$out/$1.json" > "$out/$1.log" 2>&1; }
capacity plain
tally up --metrics-port 0 > "$out/up.log" 2>&1 || exit 1
tally run --priority high -- bash -c "$(declare -f capacity); out=$out workload=$workload capacity tally_alone"
tally run --priority best-effort -- python3 -c "import torch, time; torch.ones(1, device='cuda').sum().item(); time.sleep(600)" \
    > "$out/idle_be.log" 2>&1 &
idle=$!; sleep 8
tally run --priority high -- bash -c "$(declare -f capacity); out=$out workload=$workload capacity tally_idle_be"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for name in ("plain", "tally_alone", "tally_idle_be"):
    try:
        c = json.load(open(f"{out}/{name}.json"))["capacity"]
        rows[name] = {k: round(c[k] * 1e3, 3) for k in ("service_time_s", "median_s", "p99_s")}
    except (OSError, KeyError, ValueError) as exc:
        rows[name] = {"error": str(exc)}
json.dump(rows, open(f"{out}/mps_client_cost.json", "w"), indent=1)
for name, r in rows.items():
    print(f"{name:14s} {r}")
PY
