"""GPU evidence for the agent: launch coverage and overhead.

Coverage: for each workload, the agent's launch count over N steps (read from
the agent inside the process, after warm-up) is compared with torch.profiler's
kernel count over the same N steps in a separate, identical run. The agent run
is also recorded with `tally trace`, so the CUPTI Activity API's count of
kernels executed (GPU side) is checked against the callback count of launches
(CPU side) for the whole process.

Overhead: ResNet-50 training step time (median of >= 50 steps) without and with
the agent, runs interleaved; and the agent's cost per launch from a C
microbenchmark (host time of back-to-back empty-kernel launches).

    python benchmarks/agent_evidence.py --out benchmarks/results

Writes agent_evidence.json and agent_evidence.md; prints the table last.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TALLY = [sys.executable, "-m", "tally"]

# ----------------------------------------------------------------- workers


def build_workload(name: str):
    """Returns (step, sync, expected_graph_launches_per_step)."""
    if name == "jax-jit":
        import jax
        import jax.numpy as jnp

        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, (2048, 2048), dtype=jnp.float32)
        w = jax.random.normal(key, (2048, 2048), dtype=jnp.float32)

        @jax.jit
        def f(x, w):
            h = jax.nn.gelu(x @ w)
            h = h / (1e-6 + jnp.linalg.norm(h, axis=-1, keepdims=True))
            return (h @ w.T).sum(axis=0)

        state = {"out": None}

        def step():
            state["out"] = f(x, w)

        def sync():
            if state["out"] is not None:
                state["out"].block_until_ready()

        return step, sync, 0

    import torch

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False
    dev = "cuda"
    sync = torch.cuda.synchronize
    if name == "resnet50-train":
        import torchvision

        model = torchvision.models.resnet50().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(64, 3, 224, 224, device=dev)
        y = torch.randint(0, 1000, (64,), device=dev)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step, sync, 0
    if name == "compiled-transformer-train":
        layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True, norm_first=True).to(dev)
        head = torch.nn.Linear(512, 512).to(dev)
        params = list(layer.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)

        def loss_of(x):
            return head(layer(x)).square().mean()

        compiled = torch.compile(loss_of)
        x = torch.randn(32, 128, 512, device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            compiled(x).backward()
            opt.step()

        return step, sync, 0
    if name == "cuda-graph-replay":
        import torchvision

        model = torchvision.models.resnet18().to(dev).eval()
        static_x = torch.randn(16, 3, 224, 224, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            model(static_x)

        return graph.replay, sync, 1
    raise SystemExit(f"unknown workload {name}")


def worker(args) -> None:
    step, sync, graphs_per_step = build_workload(args.workload)
    for _ in range(args.warmup):
        step()
    sync()
    result = {"workload": args.workload, "steps": args.steps, "graphs_per_step": graphs_per_step}
    if args.mode == "profiler":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            sync()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            events = json.load(open(f.name))["traceEvents"]
        result["profiler_kernels"] = sum(1 for e in events if e.get("cat") == "kernel")
    elif args.mode == "agent":
        from tally import agent

        before = agent.counters()
        if before is None:
            raise SystemExit("the tally agent is not loaded in this process")
        for _ in range(args.steps):
            step()
        sync()
        after = agent.counters()
        result.update(
            agent_active=after.active,
            agent_kernel_launches=after.kernel_launches - before.kernel_launches,
            agent_graph_launches=after.graph_launches - before.graph_launches,
            agent_entry_points=after.launch_entry_points,
        )
    elif args.mode == "time":
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        result["step_times_s"] = times
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------ orchestration


def run_worker(workload: str, mode: str, steps: int, warmup: int, prefix: list[str], env=None,
               timeout: int = 400) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = prefix + [sys.executable, __file__, "worker", "--workload", workload, "--mode", mode,
                    "--steps", str(steps), "--warmup", str(warmup), "--result", result_path]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(Path(result_path).read_text())
    result["wall_s"] = round(time.time() - t0, 1)
    result["stderr_tail"] = proc.stderr[-500:]
    os.unlink(result_path)
    return result


def trace_totals(trace_file: Path) -> dict:
    kernels = graph_launches = launches = 0
    for line in trace_file.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "kernel":
            kernels += 1
        elif rec["type"] == "process":
            launches += rec["kernel_launches"]
            graph_launches += rec["graph_launches"]
    return {"activity_kernels": kernels, "callback_kernel_launches": launches,
            "callback_graph_launches": graph_launches}


def coverage(workload: str, steps: int, warmup: int, work: Path, env: dict) -> dict:
    row: dict = {"workload": workload, "steps": steps}
    trace_file = work / f"{workload}.trace.jsonl"
    agent = run_worker(workload, "agent", steps, warmup, TALLY + ["trace", "-o", str(trace_file), "--"], env)
    row.update({k: agent[k] for k in agent if k.startswith("agent_")})
    row["graphs_per_step"] = agent["graphs_per_step"]
    row.update(trace_totals(trace_file))
    if workload != "jax-jit":
        prof = run_worker(workload, "profiler", steps, warmup, [], env)
        row["profiler_kernels"] = prof["profiler_kernels"]
    # Coverage verdicts
    if row["graphs_per_step"]:
        row["covered"] = (row["agent_graph_launches"] == steps * row["graphs_per_step"]
                          and row["agent_kernel_launches"] == 0)
        row["reference"] = "graph launches == replays (profiler kernels are the graphs' nodes)"
    elif "profiler_kernels" in row:
        row["covered"] = row["agent_kernel_launches"] == row["profiler_kernels"]
        row["reference"] = "torch.profiler kernel events over the same steps"
    else:
        row["covered"] = row["callback_kernel_launches"] + 0 == row["activity_kernels"] and \
            row["callback_graph_launches"] == 0
        row["reference"] = "CUPTI Activity kernel records of the whole process (XLA command buffers off)"
    row["trace_consistent"] = (row["callback_graph_launches"] > 0
                               or row["callback_kernel_launches"] == row["activity_kernels"])
    return row


def overhead(steps: int, rounds: int, env: dict) -> dict:
    base, agent = [], []
    for _ in range(rounds):
        base.append(run_worker("resnet50-train", "time", steps, 20, [], env))
        agent.append(run_worker("resnet50-train", "time", steps, 20, TALLY + ["run", "--"], env))
    med = lambda runs: [statistics.median(r["step_times_s"]) for r in runs]  # noqa: E731
    b, a = med(base), med(agent)
    return {
        "workload": "resnet50-train batch 64 fp32 eager",
        "steps_per_run": steps,
        "rounds": rounds,
        "baseline_median_step_ms": [round(x * 1e3, 3) for x in b],
        "agent_median_step_ms": [round(x * 1e3, 3) for x in a],
        "baseline_ms": round(statistics.median(b) * 1e3, 3),
        "agent_ms": round(statistics.median(a) * 1e3, 3),
        "overhead_pct": round((statistics.median(a) / statistics.median(b) - 1) * 100, 2),
    }


def gate_overhead(steps: int, rounds: int, env: dict) -> dict:
    """ResNet-50 training as the only client of a running tally daemon (no HP
    client): plain MPS client vs best-effort tally client. The difference is
    what the agent plus the gate's no-HP fast path cost BE."""
    from tally.daemon.client import find_daemon, mps_client_env

    subprocess.run(TALLY + ["up", "--metrics-port", "0"], env=env, check=True, capture_output=True, text=True)
    try:
        state = find_daemon()
        mps_env = dict(env, **mps_client_env(state))
        # Five clients, interleaved: plain MPS; plain MPS at BE's MPS client
        # priority; the agent alone (no scheduling); tally BE (agent + gate fast
        # path, MPS priority 1); tally BE at MPS priority 0. Separates the
        # agent's, the scheduler's and MPS priority's costs.
        configs = {
            "mps": ([], mps_env),
            "mps_client_priority_1": ([], dict(mps_env, CUDA_MPS_CLIENT_PRIORITY="1")),
            "agent_only": (TALLY + ["run", "--"], mps_env),
            "tally_be": (TALLY + ["run", "--priority", "best-effort", "--"], env),
            "tally_be_client_priority_0": (TALLY + ["run", "--priority", "best-effort", "--"],
                                           dict(env, CUDA_MPS_CLIENT_PRIORITY="0")),
        }
        runs: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(rounds):
            for name, (prefix, run_env) in configs.items():
                r = run_worker("resnet50-train", "time", steps, 20, prefix, run_env)
                runs[name].append(statistics.median(r["step_times_s"]))
        status = subprocess.run(TALLY + ["status", "--json"], env=env, capture_output=True, text=True).stdout
    finally:
        subprocess.run(TALLY + ["down", "--force"], env=env, capture_output=True, text=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "workload": "resnet50-train batch 64 fp32 eager, only client of the daemon (no HP client)",
        "steps_per_run": steps, "rounds": rounds,
        "median_step_ms": {name: round(v * 1e3, 3) for name, v in med.items()},
        "per_run_median_step_ms": {name: [round(x * 1e3, 3) for x in v] for name, v in runs.items()},
        "mps_ms": round(med["mps"] * 1e3, 3),
        "tally_be_ms": round(med["tally_be"] * 1e3, 3),
        "gate_cost_pct": round((med["tally_be"] / med["mps"] - 1) * 100, 2),
        "gate_cost_same_mps_priority_pct": round((med["tally_be_client_priority_0"] / med["mps"] - 1) * 100, 2),
        "mps_client_priority_1_cost_pct": round((med["mps_client_priority_1"] / med["mps"] - 1) * 100, 2),
        "agent_only_cost_pct": round((med["agent_only"] / med["mps"] - 1) * 100, 2),
        "status_during": status[-2000:],
    }


def launch_cost(work: Path, env: dict, rounds: int) -> dict:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    exe = work / "launch_cost"
    subprocess.run([nvcc, "-O2", "-arch=sm_90", "-o", str(exe), str(HERE / "launch_cost.cu")], check=True)
    base, agent = [], []
    for _ in range(rounds):
        base.append(float(subprocess.run([str(exe)], env=env, capture_output=True, text=True, check=True).stdout))
        agent.append(float(subprocess.run(TALLY + ["run", "--", str(exe)], env=env, capture_output=True,
                                          text=True, check=True).stdout))
    b, a = statistics.median(base), statistics.median(agent)
    return {"baseline_ns_per_launch": round(b, 1), "agent_ns_per_launch": round(a, 1),
            "agent_cost_ns_per_launch": round(a - b, 1), "rounds": rounds,
            "baseline_runs": base, "agent_runs": agent}


def environment() -> dict:
    from tally.bench.runner import collect_environment  # date, host, GPU, driver: as every benchmark records them

    info = collect_environment()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import jax

        info["jax"] = jax.__version__
    except ImportError:
        pass
    from tally import cudalibs

    info["cuda_driver_api"] = cudalibs.format_cuda_version(cudalibs.driver_version())
    cands = cudalibs.cupti_candidates()
    info["libcupti"] = str(cands[0].path) if cands else None
    return info


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Agent evidence: launch coverage and overhead",
        "",
        f"Date {env['date']}; GPU {env.get('gpu')}; driver {env.get('driver')} (CUDA {env['cuda_driver_api']}); "
        f"PyTorch {env.get('torch')} (CUDA {env.get('torch_cuda')}); JAX {env.get('jax')}; "
        f"Python {env['python']}; libcupti {env.get('libcupti')}.",
        "",
        "## Coverage",
        "",
        "| workload | steps | agent kernel launches | agent graph launches | reference count | reference "
        "| covered | whole-process callbacks vs activity kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["coverage"]:
        if "error" in row:
            lines.append(f"| {row['workload']} | - | - | - | - | error: {row['error'][:120]} | no | - |")
            continue
        ref = row.get("profiler_kernels", row["activity_kernels"])
        lines.append(
            f"| {row['workload']} | {row['steps']} | {row['agent_kernel_launches']} | "
            f"{row['agent_graph_launches']} | {ref} | {row['reference']} | "
            f"{'yes' if row['covered'] else 'NO'} | {row['callback_kernel_launches']} vs "
            f"{row['activity_kernels']} |")
    o = result.get("overhead", {})
    if "overhead_pct" in o:
        lines += ["", "## Overhead", "",
                  f"{o['workload']}: median step {o['baseline_ms']} ms without the agent, {o['agent_ms']} ms "
                  f"with it: **{o['overhead_pct']:+.2f}%** ({o['rounds']} interleaved runs of "
                  f"{o['steps_per_run']} steps each; per-run medians {o['baseline_median_step_ms']} vs "
                  f"{o['agent_median_step_ms']})."]
    go = result.get("gate_overhead", {})
    if "gate_cost_pct" in go:
        lines += ["", f"Gate with no HP client ({go['workload']}; {go['rounds']} interleaved rounds of "
                      f"{go['steps_per_run']} steps), median step ms:", "",
                      "| client | median step ms | per-run medians |", "|---|---|---|"]
        lines += [f"| {name} | {ms} | {go['per_run_median_step_ms'][name]} |" for name, ms in go["median_step_ms"].items()]
        lines += ["", f"Tally best-effort vs plain MPS: **{go['gate_cost_pct']:+.2f}%**; at the same MPS client "
                      f"priority: **{go['gate_cost_same_mps_priority_pct']:+.2f}%**; MPS client priority 1 alone: "
                      f"{go['mps_client_priority_1_cost_pct']:+.2f}%; the agent alone (no scheduling): "
                      f"{go['agent_only_cost_pct']:+.2f}%."]
    lc = result.get("launch_cost", {})
    if "agent_cost_ns_per_launch" in lc:
        lines += ["", f"Launch microbenchmark (empty kernel, host time per launch, median of {lc['rounds']} runs): "
                      f"{lc['baseline_ns_per_launch']} ns without, {lc['agent_ns_per_launch']} ns with the agent: "
                      f"**{lc['agent_cost_ns_per_launch']} ns per launch**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--workload", required=True)
    w.add_argument("--mode", choices=["profiler", "agent", "time"], required=True)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--warmup", type=int, default=5)
    w.add_argument("--result", required=True)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--overhead-steps", type=int, default=60)
    parser.add_argument("--overhead-rounds", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma list: coverage,overhead,launch,gate")
    parser.add_argument("--json-name", default="agent_evidence", help="base name of the JSON and markdown written")
    args = parser.parse_args()
    if args.cmd == "worker":
        return worker(args)

    skip = set(filter(None, args.skip.split(",")))
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # Command buffers turn XLA's kernels into graph launches; off, so every kernel is a launch.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"environment": environment(), "coverage": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "coverage" not in skip:
            for workload in ("resnet50-train", "compiled-transformer-train", "cuda-graph-replay", "jax-jit"):
                try:
                    steps = 50 if workload in ("cuda-graph-replay", "jax-jit") else args.steps
                    row = coverage(workload, steps, 5, work, env)
                except Exception as exc:  # one failing workload must not hide the others
                    row = {"workload": workload, "error": str(exc)}
                print(json.dumps(row), flush=True)
                result["coverage"].append(row)
        measurements = {
            "launch": ("launch_cost", lambda: launch_cost(work, env, 3)),
            "overhead": ("overhead", lambda: overhead(args.overhead_steps, args.overhead_rounds, env)),
            "gate": ("gate_overhead", lambda: gate_overhead(args.overhead_steps, args.overhead_rounds, env)),
        }
        for name, (key, measure) in measurements.items():
            if name in skip:
                continue
            try:
                result[key] = measure()
            except Exception as exc:  # recorded; the other measurements still run
                result[key] = {"error": str(exc)}
            print(json.dumps(result[key]), flush=True)
    (out / f"{args.json_name}.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / f"{args.json_name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
