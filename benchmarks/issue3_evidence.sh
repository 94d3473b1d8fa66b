#!/usr/bin/env bash
# Issue 3's open measurements in one GPU session, each step time-boxed so that a
# 10-minute device call keeps what finished:
#   0. what the GPU-side gate lets past a closed word, and what its waits cost (gpu_gate_lookahead.py)
#   1. host cost per BE launch on each gate path (tracked_launch_cost.py)
#   2. what the gate costs BE with no HP client against plain MPS, interleaved over five rounds
#      (gate_depth_cost.py --rounds 5; EVIDENCE_DEPTH_CONFIGS adds e.g. idle-hp-gpu-gate)
#   3. the issue's two pairs under EVIDENCE_SYSTEMS, once per seed of EVIDENCE_SEEDS
#   4. what a second MPS client that runs nothing costs HP, inside one HP process
#      (second_client_cost.py: idle clients come and go around HP's back-to-back requests)
#   5. whether BE training steps are bound by the host's launches or by the GPU, with and without
#      the agent (be_host_bound.py): whether the gate's host cost per launch can cost throughput
#
#   bash benchmarks/issue3_evidence.sh OUT_DIR [STEPS]     STEPS: any of 0 1 2 3 4 5, run in the order given
#                                                         (default "3 2": steps 0 and 1 were measured on
#                                                         2026-12-03 and change only with the agent)
#
# Environment: EVIDENCE_BUDGET_S (default 570) bounds the whole script;
# EVIDENCE_SEEDS (default "0": four systems take about 5 min a seed) the pair runs;
# EVIDENCE_SYSTEMS (default "standalone,tally,tally[be-thread-percent=90],
# tally[be-thread-percent=90;hp-stream-priority=1]") their systems.
# A step starts only with time left for it (a minimum per step, below), and is killed at the
# end of the budget (TERM, then KILL 10 s later).
# EVIDENCE_COMMIT names the commit of the tree sent to the device (its .git may be stale);
# EVIDENCE_TAR=FILE packs OUT_DIR into FILE at the end (a device that returns only a few files);
# the raw HP latency files are dropped either way (runs/ keeps every latency).
set -u
out=${1:?usage: issue3_evidence.sh OUT_DIR [STEPS]}
steps=${2:-"3 2"}
start=$(date +%s)
budget=${EVIDENCE_BUDGET_S:-570}
left() { echo $(( budget - ($(date +%s) - start) )); }
# boxed SECONDS MIN_SECONDS LOG CMD...: CMD for at most SECONDS (and the budget's rest), if MIN_SECONDS are left
boxed() {
  local cap=$1 need=$2 log=$3; shift 3
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt "$need" ]; then echo "skipped: $(left) s left" > "$log"; return 124; fi
  timeout -k 10 -s TERM "$t" "$@" > "$log" 2>&1
}
mkdir -p "$out"
cleanup() { python3 -m tally down --force >/dev/null 2>&1; true; }
finish() {
    cleanup
    [ -n "${EVIDENCE_TAR:-}" ] && tar czf "$EVIDENCE_TAR" -C "$(dirname "$out")" "$(basename "$out")"
    true
}
trap finish EXIT
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
  # the lent device's copy of .git may lag the working tree it was sent: the caller names the commit
  echo "commit: ${EVIDENCE_COMMIT:-unknown (set EVIDENCE_COMMIT: the git log of the device copy may be stale)}"
  git log --oneline -1 2>/dev/null; } > "$out/env.txt" 2>&1

for step in $steps; do
  case $step in
  0) boxed 60 20 "$out/lookahead.log" python3 benchmarks/gpu_gate_lookahead.py --out "$out/lookahead"
     echo "step 0 rc=$? at $(( $(date +%s) - start )) s" >> "$out/env.txt" ;;
  1) boxed 60 30 "$out/launch.log" python3 benchmarks/tracked_launch_cost.py --out "$out/launch"
     echo "step 1 rc=$? at $(( $(date +%s) - start )) s" >> "$out/env.txt" ;;
  2) boxed 300 120 "$out/depth.log" python3 benchmarks/gate_depth_cost.py --out "$out/depth" \
       --workloads resnet50-train --seconds 6 --rounds 5 --configs "${EVIDENCE_DEPTH_CONFIGS:-mps,tally-no-hp}"
     echo "step 2 rc=$? at $(( $(date +%s) - start )) s" >> "$out/env.txt" ;;
  4) boxed 300 150 "$out/second-client.log" python3 benchmarks/second_client_cost.py --out "$out/second-client"
     echo "step 4 rc=$? at $(( $(date +%s) - start )) s" >> "$out/env.txt" ;;
  5) boxed 240 90 "$out/host-bound.log" python3 benchmarks/be_host_bound.py --out "$out/host-bound"
     echo "step 5 rc=$? at $(( $(date +%s) - start )) s" >> "$out/env.txt" ;;
  3) for seed in ${EVIDENCE_SEEDS:-0}; do
       systems=${EVIDENCE_SYSTEMS:-standalone,tally,tally[be-thread-percent=90],tally[be-thread-percent=90;hp-stream-priority=1]}
       boxed 600 240 "$out/pairs-seed$seed.log" python3 -m tally bench --hp bert-infer@graph \
         --be resnet50-train,bert-base-train --systems "$systems" --arrivals poisson --duration 15 \
         --seed "$seed" --out "$out/pairs-seed$seed"
       echo "step 3 seed $seed rc=$? at $(( $(date +%s) - start )) s" >> "$out/env.txt"
       find "$out/pairs-seed$seed/raw" -name hp.json -delete 2>/dev/null
     done
     set -- "$out"/pairs-seed*/runs
     [ $# -ge 2 ] && python3 -m tally bench $(for d in "$@"; do printf -- '--combine %s ' "${d%/runs}"; done) \
       --out "$out" > /dev/null 2>> "$out/env.txt" ;;
  esac
  cleanup
done
