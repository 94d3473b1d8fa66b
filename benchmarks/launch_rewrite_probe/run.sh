#!/usr/bin/env bash
# Build and run the launch-rewrite probe on a GPU machine; prints one JSON line per mode.
#   bash benchmarks/launch_rewrite_probe/run.sh OUTDIR
# Expected if the driver honours the rewrite: grid -> [5,0,0,0]; func -> [1005,...]; param -> [77,...].
set -u
here=$(cd "$(dirname "$0")" && pwd); out=${1:-/tmp/launch_rewrite_probe}; mkdir -p "$out"
cupti=$(python3 -c "from tally.cudalibs import cupti_candidates; print(cupti_candidates()[0].path)" 2>/dev/null)
[ -n "$cupti" ] || cupti=$(find / -name 'libcupti.so*' 2>/dev/null | head -1)
cc -std=c11 -O2 -shared -fPIC -o "$out/probe_inject.so" "$here/probe_inject.c" -ldl || exit 1
nvcc -O2 -arch=sm_90 -o "$out/probe_app" "$here/probe_app.cu" || exit 1
for mode in none grid func param; do
    result=$(PROBE_MODE=$mode PROBE_CUPTI=$cupti CUDA_INJECTION64_PATH=$out/probe_inject.so "$out/probe_app" 2> "$out/$mode.err")
    echo "{\"mode\": \"$mode\", \"result\": $result, \"log\": \"$(tr -d '"\n' < "$out/$mode.err")\"}"
done | tee "$out/probe.jsonl"
