"""Host cost of one best-effort kernel launch on each of the gate's paths.

benchmarks/launch_cost.cu times back-to-back launches of an empty kernel (host
time only). Here it runs as a client of one tally daemon (MPS), in turn:

  mps               a plain MPS client, no agent
  agent-only        the same with the agent injected but not scheduling (no
                    `tally run`, no priority): what CUPTI's launch callbacks
                    and the agent's counting cost by themselves
  be-no-hp          tally best effort, no HP client: the gate's fast path
  be-tracked        an HP client is connected (idle), launch-level gate
                    (TALLY_GPU_GATE=0): every launch is tracked (completion
                    write, gate check); estimates from the polls
  be-tracked-kernel-times  the same with TALLY_KERNEL_TIMES=1 (CUPTI activity)
  be-tracked-batched  the same as be-tracked with TALLY_BATCH_WRITES=1 (completion
                    writes shared)
  be-gpu-gate       an HP client is connected (idle), the GPU-side gate (tally
                    run's default): every launch enqueues a stream wait first

    python3 benchmarks/tracked_launch_cost.py --out DIR [--rounds 3]

Writes tracked_launch_cost.json and .md in DIR; ns per launch, median of the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gate_depth_cost import IDLE_HP  # the same idle HP client (this directory is on sys.path)
from gpu_session import TALLY, daemon_down, daemon_up, mps_env

HERE = Path(__file__).resolve().parent

AGENT_ONLY = "agent-only"
CONFIGS = [
    ("mps", False, None),
    (AGENT_ONLY, False, None),
    ("be-no-hp", False, {}),
    ("be-tracked", True, {"TALLY_GPU_GATE": "0"}),
    ("be-tracked-kernel-times", True, {"TALLY_GPU_GATE": "0", "TALLY_KERNEL_TIMES": "1"}),
    ("be-tracked-batched", True, {"TALLY_GPU_GATE": "0", "TALLY_BATCH_WRITES": "1"}),
    ("be-gpu-gate", True, {"TALLY_GPU_GATE": "1"}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    exe = work / "launch_cost"
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    subprocess.run([nvcc, "-O2", "-arch=sm_90", "-o", str(exe), str(HERE / "launch_cost.cu")], check=True)
    env = dict(os.environ)
    error = daemon_up(env)
    if error:
        raise SystemExit(f"tracked_launch_cost: {error}")
    hp = None
    rows = []
    try:
        try:
            mps_run_env = dict(env, **mps_env())
        except RuntimeError as exc:
            raise SystemExit(f"tracked_launch_cost: {exc}") from None
        for name, tracked, extra in CONFIGS:
            if tracked and hp is None:
                hp = subprocess.Popen(TALLY + ["run", "--priority", "high", "--", sys.executable, "-c", IDLE_HP, "600"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                if hp.stdout.readline().strip() != "joined":
                    raise SystemExit(f"idle HP client did not start: {hp.stderr.read()[-500:]}")
            if name == AGENT_ONLY:
                from tally.launcher import agent_env

                # no priority, whatever the caller's environment says: the agent only counts
                base = {k: v for k, v in mps_run_env.items() if k != "TALLY_PRIORITY"}
                cmd, run_env = [str(exe)], agent_env([str(exe)], base)
            elif extra is None:
                cmd, run_env = [str(exe)], mps_run_env
            else:
                cmd = TALLY + ["run", "--priority", "best-effort", "--", str(exe)]
                run_env = dict(env, **extra)
            values = []
            for _ in range(args.rounds):
                proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
                if proc.returncode != 0:
                    raise SystemExit(f"{name}: {proc.stderr[-500:]}")
                values.append(float(proc.stdout.strip().splitlines()[-1]))
            rows.append({"config": name, "ns_per_launch": statistics.median(values), "rounds": values})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if hp is not None:
            hp.terminate()
            hp.wait(timeout=20)
        daemon_down(env)
    base = rows[0]["ns_per_launch"]
    lines = ["| configuration | ns per launch | over mps | rounds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['ns_per_launch']:.0f} | {r['ns_per_launch'] - base:+.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['rounds'])} |")
    (args.out / "tracked_launch_cost.json").write_text(json.dumps({"rows": rows}, indent=1))
    (args.out / "tracked_launch_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
