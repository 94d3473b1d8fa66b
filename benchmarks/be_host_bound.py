"""Whether a best-effort training step is bound by the host's launches or by the GPU, with and
without tally's agent: where the gate's per-launch host cost could show in throughput at all.

The gate costs a BE launch some host time (+84 ns over plain MPS with no HP client on an H200,
benchmarks/results/issue3-floor-2026-12-03f-h200). That costs throughput only while the host
enqueues slower than the GPU runs. A training step that synchronizes at its end takes about
max(enqueue time, GPU time); this times both parts of each step:

  enqueue   step start until the last launch call returned (zero_grad .. optimizer.step)
  step      step start until the GPU finished (after the synchronize)

and the launches per step (the agent's counters, under tally). The margin, step - enqueue, is
how much host time per step the agent could add before throughput moved.

    python3 benchmarks/be_host_bound.py --out DIR [--workloads resnet50-train,bert-base-train] [--steps 60]

Each workload runs twice as the only client of a tally daemon's MPS: as a plain MPS client (no
agent) and under `tally run --priority best-effort` (no HP client: the gate's fast path).
Writes be_host_bound.json and .md in DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_session import TALLY, daemon_down, daemon_up, heading, last_line, mps_env  # this directory is on sys.path


def steps_of(workload: str, steps: int, warmup: int) -> dict:
    """In the BE process: time each step's enqueue and the whole step."""
    import torch

    from tally import agent
    from tally.bench.workloads import build, parse_ref

    job = build(parse_ref(workload, role="be"), "be", {})
    if not callable(getattr(job, "enqueue_step", None)):
        raise SystemExit(f"be_host_bound: {workload} is not a PyTorch training workload")
    for _ in range(warmup):
        job.step()
    enqueue, whole, launches = [], [], []
    for _ in range(steps):
        before = agent.counters()
        t0 = time.perf_counter()
        job.enqueue_step()
        t1 = time.perf_counter()
        if job.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        t2 = time.perf_counter()
        after = agent.counters()
        enqueue.append((t1 - t0) * 1e3)
        whole.append((t2 - t0) * 1e3)
        if before and after:
            launches.append(after.kernel_launches - before.kernel_launches)
    return {"enqueue_ms": enqueue, "step_ms": whole, "launches": launches}


def summary(row: dict) -> dict:
    enqueue, step = statistics.median(row["enqueue_ms"]), statistics.median(row["step_ms"])
    out = {"enqueue_ms": enqueue, "step_ms": step, "margin_ms": step - enqueue,
           "host_bound_steps": sum(e > 0.9 * s for e, s in zip(row["enqueue_ms"], row["step_ms"])) / len(row["step_ms"])}
    if row.get("launches"):
        out["launches_per_step"] = statistics.median(row["launches"])
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [heading("BE steps: host enqueue against GPU", env), "",
             f"{result['steps']} steps after {result['warmup']} of warm-up; medians. Margin: step - enqueue, the host "
             "time per step the agent could add before the step took longer. Host-bound steps: enqueue above 90% "
             "of the step.", "",
             "| workload | client | enqueue ms | step ms | margin ms | host-bound steps | launches/step |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s = r["summary"]
        launches = f"{s['launches_per_step']:.0f}" if "launches_per_step" in s else "-"
        lines.append(f"| {r['workload']} | {r['client']} | {s['enqueue_ms']:.2f} | {s['step_ms']:.2f} | "
                     f"{s['margin_ms']:.2f} | {s['host_bound_steps']:.0%} | {launches} |")
    return "\n".join(lines) + "\n"


def run_client(client: str, workload: str, args, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--in-process", workload, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if client == "mps":
        run_env = dict(env, **mps_env())
    else:
        cmd = TALLY + ["run", "--priority", "best-effort", "--"] + cmd
        run_env = env
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{workload} as {client} failed ({proc.returncode}): {last_line(proc.stderr)}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workloads", default="resnet50-train,bert-base-train")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--in-process", metavar="WORKLOAD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(steps_of(args.in_process, args.steps, args.warmup)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    from gate_depth_cost import environment

    env = dict(os.environ)
    args.out.mkdir(parents=True, exist_ok=True)
    error = daemon_up(env)
    if error:
        print(f"be_host_bound: {error}", file=sys.stderr)
        return 1
    result = {"environment": environment(), "steps": args.steps, "warmup": args.warmup, "rows": [], "errors": []}
    try:
        for workload in filter(None, args.workloads.split(",")):
            for client in ("mps", "tally-no-hp"):
                try:
                    row = run_client(client, workload, args, env)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    result["errors"].append(str(exc).splitlines()[0])
                    print(f"be_host_bound: {result['errors'][-1]}", file=sys.stderr)
                    continue
                result["rows"].append({"workload": workload, "client": client, **row, "summary": summary(row)})
    finally:
        daemon_down(env)
    (args.out / "be_host_bound.json").write_text(json.dumps(result, indent=1))
    (args.out / "be_host_bound.md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
