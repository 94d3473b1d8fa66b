"""What the gate costs a best-effort training job while an HP client is connected but sends nothing.

Next to a real HP job, BE runs only in HP's idle gaps, and there with at most
the turnaround budget of work in flight (tally up --budget-us, 0.1 ms). This
script separates that regime from HP's interference: one BE training program,
timed in turn as

  mps           a plain client of the daemon's MPS (no agent): the reference
  tally-no-hp   a tally best-effort client with no HP client (the gate's fast path)
  idle-hp       tally BE under the launch-level gate (TALLY_GPU_GATE=0) next to
                an HP client that joined and then only sleeps: after
                --unthrottle-ms (100 ms) BE work in flight is bounded by the
                2 ms idle depth; every launch is tracked
  budget-N      the same, never unthrottled: BE work in flight stays bounded by
                an N us budget for the whole run (what BE meets between HP
                requests)
  idle-hp-gpu-gate  tally's default, the GPU-side gate, next to the same idle HP
                client: the gate word stays open, every launch waits on it on
                the GPU (no budget, no tracking)
  *-kernel-times  (with --kernel-times) the same with TALLY_KERNEL_TIMES=1:
                duration estimates learned from the GPU's kernel times (CUPTI
                activity), not from when the gate's polls see completions
  *-batched     (with --batched) the same with TALLY_BATCH_WRITES=1: launches
                share completion writes
  *-run-ahead   (with --run-ahead) the same with TALLY_RUN_AHEAD=1: held
                launches wait on the GPU, not in the program's thread

The daemon is restarted for each configuration. BE throughput is steps per
second over --seconds after the bench worker's warm-up; the BE client's gate
counters come from `tally status --json` taken while it runs. Each round runs
every configuration once (in reverse order every other round), so a
configuration's ratio to mps is also taken per round, against that round's mps run; the table gives the median and range of
those paired ratios beside the ratio of medians.

cuDNN's algorithm choice by timing (cudnn.benchmark) is off unless
--cudnn-benchmark: it may pick differently in each run. With it on, one
configuration's steps/s spread by 15% between rounds (H200, 2026-12-03), far
more than the cost measured here; the algorithm choice is the spread's one
source this script can remove.

    python3 benchmarks/gate_depth_cost.py --out DIR [--workloads bert-base-train,resnet50-train]

Writes gate_depth_cost.json and gate_depth_cost.md in DIR; prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_session import TALLY, daemon_down, daemon_up, mps_env  # this directory is on sys.path

# A client that joins as HP (its first launch) and then never launches again.
IDLE_HP = ("import sys, time, torch\n"
           "x = torch.ones(8, device='cuda'); float((x * 2).sum())\n"
           "print('joined', flush=True); time.sleep(float(sys.argv[1]))\n")


LAUNCH_LEVEL = {"TALLY_GPU_GATE": "0"}  # tally run's default is the GPU-side gate, which has no budget


def configs(budgets: list[int], kernel_times: bool = False, batched: bool = False, run_ahead: bool = False) -> list[dict]:
    out = [
        {"name": "mps", "up": [], "hp": False, "client": "mps"},
        {"name": "tally-no-hp", "up": [], "hp": False, "client": "tally"},
        {"name": "idle-hp", "up": [], "hp": True, "client": "tally", "env": LAUNCH_LEVEL},
    ]
    for b in budgets:
        out.append({"name": f"budget-{b}", "up": ["--budget-us", str(b), "--unthrottle-ms", "10000000"],
                    "hp": True, "client": "tally", "env": LAUNCH_LEVEL})
    gated = [c for c in out if c["hp"]]
    out.append({"name": "idle-hp-gpu-gate", "up": [], "hp": True, "client": "tally", "env": {"TALLY_GPU_GATE": "1"}})

    def variant(c: dict, suffix: str, env: dict) -> dict:
        return dict(c, name=c["name"] + suffix, env={**c.get("env", {}), **env})

    if kernel_times:
        out += [variant(c, "-kernel-times", {"TALLY_KERNEL_TIMES": "1"}) for c in gated]
    if batched:
        out += [variant(c, "-batched", {"TALLY_BATCH_WRITES": "1"}) for c in gated]
    if run_ahead:
        out += [variant(c, "-run-ahead", {"TALLY_RUN_AHEAD": "1"}) for c in gated]
    return out


def be_status(stop: threading.Event, seen: dict) -> None:
    """Keeps the last status entry of the best-effort client (its counters vanish with it)."""
    while not stop.wait(1.0):
        out = subprocess.run(TALLY + ["status", "--json"], capture_output=True, text=True)
        try:
            status = json.loads(out.stdout)
        except ValueError:
            continue
        for gpu in status.get("gpus", []):
            for c in gpu.get("clients", []):
                if c.get("priority") == "best-effort" and c.get("state") == "active":
                    seen.update(c)


def run_config(cfg: dict, workload: str, seconds: float, env: dict) -> dict:
    error = daemon_up(env, *cfg["up"])
    if error:
        raise RuntimeError(error)
    hp = None
    try:
        if cfg["hp"]:
            hp = subprocess.Popen(TALLY + ["run", "--priority", "high", "--", sys.executable, "-c", IDLE_HP,
                                           str(seconds + 300)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if hp.stdout.readline().strip() != "joined":
                raise RuntimeError(f"idle HP client did not start: {hp.stderr.read()[-500:]}")
        with tempfile.TemporaryDirectory() as tmp:
            if cfg["client"] == "mps":
                be_env = dict(env, **mps_env())
                prefix: list[str] = []
            else:
                be_env = dict(env, **cfg.get("env", {}))
                prefix = TALLY + ["run", "--priority", "best-effort", "--stats-dir", tmp, "--"]
            result_path = Path(tmp) / "be.json"
            stop, seen = threading.Event(), {}
            watcher = threading.Thread(target=be_status, args=(stop, seen), daemon=True)
            watcher.start()
            cmd = prefix + [sys.executable, "-m", "tally.bench.worker", "--workload", workload, "--role", "be",
                            "--duration", str(seconds), "--result", str(result_path)]
            proc = subprocess.run(cmd, env=be_env, capture_output=True, text=True, timeout=seconds + 600)
            stop.set()
            watcher.join()
            if proc.returncode != 0 or not result_path.exists():
                raise RuntimeError(f"BE worker failed ({proc.returncode}): {proc.stderr[-800:]}")
            result = json.loads(result_path.read_text())
            agent = [json.loads(q.read_text()) for q in Path(tmp).glob("stats-*.json")]
    finally:
        if hp is not None:
            hp.terminate()
            try:
                hp.wait(timeout=20)
            except subprocess.TimeoutExpired:
                hp.kill()
        daemon_down(env)
    ends = result.get("step_end_times") or []
    if result.get("error") or len(ends) < 3:
        raise RuntimeError(f"BE worker: {result.get('error') or 'fewer than 3 steps'}")
    row = {"workload": workload, "config": cfg["name"], "steps": len(ends) - 1,
           "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0])}
    for key in ("launches", "held_ms", "held_launches", "long_kernels"):
        if key in seen:
            row[key] = seen[key]
    for stats in agent:
        if stats.get("kernel_launches"):  # the worker, not a helper process
            row["kernel_times"] = stats.get("kernel_times")
            row["gpu_timed_samples"] = stats.get("gpu_timed_samples")
    return row


def environment() -> dict:
    """tally bench's environment (date, GPU, driver) and the Python and PyTorch the workers run."""
    from tally.bench.runner import collect_environment

    out = collect_environment()
    probe = subprocess.run([sys.executable, "-c", "import torch,sys;print(sys.version.split()[0], torch.__version__)"],
                           capture_output=True, text=True)
    out["python_torch"] = probe.stdout.strip()
    return out


def round_order(plan: list, round_: int) -> list:
    """The configurations in plan order, reversed every other round: a drift within rounds (the
    GPU warming, say) then favours no configuration by always running it first."""
    return list(plan) if round_ % 2 == 0 else list(reversed(plan))


def paired_ratios(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(workload, configuration) -> its steps/s over mps's in the same round, for rounds that have both."""
    mps = {(r["workload"], r.get("round")): r["steps_per_s"] for r in rows if r["config"] == "mps"}
    out: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        ref = mps.get((r["workload"], r.get("round")))
        if ref:
            out.setdefault((r["workload"], r["config"]), []).append(r["steps_per_s"] / ref)
    return out


def markdown(result: dict) -> str:
    """One line per (workload, configuration): the median over rounds, each round's steps/s, the
    median and range of the per-round ratios to mps, and the gate's counters of the last round."""
    env = result["environment"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["workload"], row["config"]), []).append(row)
    median = {key: statistics.median(r["steps_per_s"] for r in rows) for key, rows in groups.items()}
    paired = paired_ratios(result["rows"])
    lines = [f"# Gate depth cost ({env['date']}, {env.get('gpu', '?')}, driver {env.get('driver', '?')}, "
             f"Python/PyTorch {env['python_torch']})", "",
             f"{result['seconds']:g} s of BE training per configuration after warm-up, "
             f"{result.get('rounds', 1)} round(s) with the configurations interleaved (reversed every other round); "
             "the HP client joined "
             "and then sent nothing; cuDNN benchmark mode "
             f"{'on' if result.get('cudnn_benchmark') else 'off'}. vs mps: median steps/s against the plain MPS "
             "client's. Paired: the median of each round's ratio to that round's mps run (range in brackets).", "",
             "| workload | configuration | steps/s (median) | vs mps | paired | per round | launches | held ms "
             "| held launches | alone (long) | GPU-timed samples |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (workload, config), rows in groups.items():
        ref = median.get((workload, "mps"))
        ratio = f"{median[workload, config] / ref:.3f}" if ref else "-"
        pairs = paired.get((workload, config))
        pair = (f"{statistics.median(pairs):.3f} [{min(pairs):.3f}-{max(pairs):.3f}]" if pairs else "-")
        cells = [workload, config, f"{median[workload, config]:.2f}", ratio, pair,
                 ", ".join(f"{r['steps_per_s']:.2f}" for r in rows)]
        cells += [str(round(rows[-1][k])) if rows[-1].get(k) is not None else "-"
                  for k in ("launches", "held_ms", "held_launches", "long_kernels", "gpu_timed_samples")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workloads", default="bert-base-train,resnet50-train")
    parser.add_argument("--budgets", default="100,400", help="comma list of budgets in us (never unthrottled)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, interleaved")
    parser.add_argument("--configs", default="", help="comma list: only these configurations")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN pick algorithms by timing them, in each run anew (off: its heuristics)")
    parser.add_argument("--kernel-times", action="store_true", help="also each HP configuration with TALLY_KERNEL_TIMES=1")
    parser.add_argument("--batched", action="store_true", help="also each HP configuration with TALLY_BATCH_WRITES=1")
    parser.add_argument("--run-ahead", action="store_true", help="also each HP configuration with TALLY_RUN_AHEAD=1")
    args = parser.parse_args()
    env = dict(os.environ, TALLY_BENCH_CUDNN_BENCHMARK="1" if args.cudnn_benchmark else "0")
    wanted = {c for c in args.configs.split(",") if c}
    known = configs([int(b) for b in args.budgets.split(",") if b], args.kernel_times, args.batched, args.run_ahead)
    if wanted - {c["name"] for c in known}:
        parser.error(f"unknown configuration(s): {', '.join(sorted(wanted - {c['name'] for c in known}))}")
    plan = [c for c in known if not wanted or c["name"] in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), "seconds": args.seconds, "rounds": args.rounds,
              "cudnn_benchmark": args.cudnn_benchmark, "rows": [], "errors": []}
    for workload, round_, cfg in [(w, r, c) for w in args.workloads.split(",") if w
                                  for r in range(args.rounds) for c in round_order(plan, r)]:
        t0 = time.time()
        try:
            row = run_config(cfg, workload, args.seconds, env)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["errors"].append({"workload": workload, "config": cfg["name"], "error": str(exc)})
            print(f"{workload} {cfg['name']}: {exc}", file=sys.stderr)
            continue
        row["wall_s"] = round(time.time() - t0, 1)
        row["round"] = round_
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "gate_depth_cost.json").write_text(json.dumps(result, indent=1))
    (args.out / "gate_depth_cost.json").write_text(json.dumps(result, indent=1))
    (args.out / "gate_depth_cost.md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["errors"] and not result["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
