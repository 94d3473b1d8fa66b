#!/usr/bin/env bash
# GPU smoke test of the daemon and the launch-level gate with the microbenchmark
# pair of DESIGN.md fact 5 (HP: bursts of 20 short kernels; BE: back-to-back
# ~1 ms kernels). Prints each system's HP p50/p99 and BE kernels/s.
# Usage: benchmarks/gate_smoke.sh OUTDIR   (needs nvcc, an NVIDIA GPU, MPS)
set -u
out=${1:-/tmp/gate_smoke}; mkdir -p "$out"
export TALLY_RUNTIME_DIR=${TALLY_RUNTIME_DIR:-/tmp/tally-smoke-rt}
tally() { python3 -m tally "$@"; }
cleanup() { tally down --force >/dev/null 2>&1; }
trap cleanup EXIT
nvcc -O2 -arch=sm_90 -o /tmp/colo benchmarks/microbench_colo.cu -lpthread || exit 1
D=8
pair() {  # $1 tag, $2 BE prefix, $3 HP prefix
  $2 /tmp/colo be $((D + 2)) "$1" > "$out/$1.be.txt" 2>&1 &
  local be=$!
  sleep 1
  $3 /tmp/colo hp $D "$1" > "$out/$1.hp.txt" 2>&1
  wait $be
  echo "$1: $(grep -h 'HP\]' "$out/$1.hp.txt") | $(grep -h 'BE\]' "$out/$1.be.txt")"
}
/tmp/colo hp $D alone; /tmp/colo be $D alone
pair time-slicing "" ""
tally up --policy passthrough --metrics-port 0 || exit 1
pair mps "tally run --priority best-effort --" "tally run --priority high --"
tally down
tally up --metrics-port 0 || exit 1
tally status
pair tally "tally run --priority best-effort --" "tally run --priority high --"
tally status --json > "$out/status_after.json"
tally down
# Fail-open: the daemon dies under a running BE client.
tally up --metrics-port 0 || exit 1
TALLY_VERBOSE=1 tally run --priority best-effort -- /tmp/colo be 6 failopen > "$out/failopen.be.txt" 2>&1 &
be=$!; sleep 2
kill -9 "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/state.json"))["pid"])' "$TALLY_RUNTIME_DIR" 2>/dev/null)" 2>/dev/null
wait $be; echo "failopen BE rc=$? :: $(tr '\n' ' ' < "$out/failopen.be.txt")"
