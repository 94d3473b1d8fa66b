"""`tally bench`: run the co-location benchmark matrix and write its report."""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
from pathlib import Path

import click

from tally.errors import TallyError

ALLOW_NO_GPU_ENV = "TALLY_BENCH_ALLOW_NO_GPU"

# presets: (hp workloads, be workloads, loads, duration s); systems default to all
QUICK = {
    "hp": ["bert-infer@graph", "llama-decode"],  # GPU-bound HP: CUDA graphs (DESIGN.md fact 6)
    "be": ["resnet50-train", "gpt2-train"],
    "loads": [0.5],
    "duration": 8.0,
}
PAPER_SWEEP_PAIRS = [("bert-infer", "gpt2-train"), ("llama-decode", "resnet50-train")]
PAPER_SWEEP_LOADS = [0.25, 0.75]
PAPER_DURATION = 60.0


def gpu_present() -> bool:
    """Cheap check: `nvidia-smi -L` lists a GPU, or a /dev/nvidia<N> device node exists."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and "GPU" in out.stdout:
                return True
        except (OSError, subprocess.TimeoutExpired):
            pass
    return any(Path("/dev").glob("nvidia[0-9]*"))


def require_gpu(refs) -> None:
    """One-line error without a GPU. Fake-only runs may skip the check with TALLY_BENCH_ALLOW_NO_GPU=1."""
    if os.environ.get(ALLOW_NO_GPU_ENV) == "1" and refs and all(r.fake for r in refs):
        return
    if not gpu_present():
        raise TallyError("no NVIDIA GPU found (nvidia-smi -L lists none and there is no /dev/nvidia0); "
                         "tally bench needs one")


def _split(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def _parse_part(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise TallyError(f"--part {text!r} is not N/M (e.g. 2/4)") from None
    if not 1 <= index <= count:
        raise TallyError(f"--part {text}: N must be in 1..M")
    return index, count


def _parse_window(text: str | None) -> tuple[float | None, float | None]:
    if not text:
        return None, None
    start, _, length = text.partition(":")
    try:
        return (float(start) if start else None), (float(length) if length else None)
    except ValueError:
        raise TallyError(f"--trace-window {text!r} is not START:LENGTH in seconds (e.g. 0:86400)") from None


def build_plan(hp: list[str], be: list[str], systems: list[str], loads: list[float], paper: bool):
    from tally.bench.runner import RunKey

    keys = [RunKey(h, b, s, load) for load in loads for h in hp for b in be for s in systems]
    if paper:
        keys += [RunKey(h, b, s, load) for load in PAPER_SWEEP_LOADS for (h, b) in PAPER_SWEEP_PAIRS
                 for s in systems]
    return keys


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="2 HP x 2 BE x all systems at load 0.5, 8 s runs (--dry-run prints the estimate).")
@click.option("--paper", is_flag=True, help="Full matrix at load 0.5 + load sweep for two pairs, 60 s runs (hours; use --part).")
@click.option("--part", "part", metavar="N/M", help="Run only the N-th of M slices of the plan (resumable).")
@click.option("--hp", "hp", multiple=True, metavar="WORKLOAD", help="HP (inference) workloads, comma-separated or repeated.")
@click.option("--be", "be", multiple=True, metavar="WORKLOAD", help="BE (training) workloads, comma-separated or repeated.")
@click.option("--systems", "systems", multiple=True, metavar="NAMES", help="Systems (default: all).")
@click.option("--load", "loads", multiple=True, metavar="L", help="Offered HP load(s) as a fraction of capacity (default 0.5).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Azure Functions 2021 invocation CSV.")
@click.option("--trace-function", help="app/func (or func) of the trace to replay (default: the busiest).")
@click.option("--trace-window", metavar="START:LENGTH", help="Window of the trace in seconds (default: all of it).")
@click.option("--arrivals", "arrival_source", type=click.Choice(["bursty", "poisson"]), default="bursty",
              show_default=True, help="Synthetic arrival process when no --trace is given.")
@click.option("--duration", type=float, help="Measured seconds per run (default 20; presets set their own).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output dir (default benchmarks/results/bench-<date>).")
@click.option("--report-only", "report_only", type=click.Path(file_okay=False, exists=True),
              help="Only (re)write the report of an existing output dir; needs no GPU.")
@click.option("--combine", "combine", multiple=True, metavar="DIR",
              help="Summarize two or more output dirs of the same matrix (repeated runs): median and range "
                   "per (HP, BE, load, system); with --out, also DIR/combined.md; needs no GPU.")
@click.option("--hp-cmd", help="HP program for workload 'command' (line protocol; docs/bench.md).")
@click.option("--be-cmd", help="BE program for workload 'command' (line protocol; docs/bench.md).")
@click.option("--hp-option", multiple=True, metavar="KEY=VALUE", help="Option for the HP workload factory (e.g. batch=8).")
@click.option("--be-option", multiple=True, metavar="KEY=VALUE", help="Option for the BE workload factory.")
@click.option("--mps-split-percent", type=click.IntRange(1, 100), default=50, show_default=True,
              help="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of BE under mps-split.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reuse/--no-reuse", "reuse", default=True, show_default=True,
              help="Reuse worker processes across runs of a system (one build + warm-up each); --no-reuse: "
                   "one process pair per run.")
@click.option("--list", "list_only", is_flag=True, help="List workloads and systems, then exit; needs no GPU.")
@click.option("--dry-run", is_flag=True, help="Print the plan and its estimated time, then exit; needs no GPU.")
def bench_command(quick, paper, part, hp, be, systems, loads, trace_path, trace_function, trace_window,
                  arrival_source, duration, out_dir, report_only, combine, hp_cmd, be_cmd, hp_option, be_option,
                  mps_split_percent, seed, reuse, list_only, dry_run):
    """Run HP inference next to BE training under each sharing system; write JSON, markdown and charts."""
    from tally.bench import workloads as registry
    from tally.bench.systems import SYSTEM_NAMES, make_system

    if combine:
        _combine(click.get_current_context(), combine, out_dir)
        return
    if list_only:
        _print_list()
        return
    if report_only:
        from tally.bench.report import write_report

        click.echo(f"wrote {write_report(report_only)}")
        return
    if quick and paper:
        raise TallyError("--quick and --paper exclude each other")

    # the selection is parsed first (no side effects) only so that the GPU check can
    # tell fake-only runs apart; nothing runs before the check
    hp_list = _split(hp) or (QUICK["hp"] if quick else registry.real_workloads(registry.INFER) if paper else [])
    be_list = _split(be) or (QUICK["be"] if quick else registry.real_workloads(registry.TRAIN) if paper else [])
    if not hp_list or not be_list:
        raise TallyError("give --hp and --be workloads, or a preset (--quick / --paper); --list shows them")
    refs = ([registry.parse_ref(h, "hp", hp_cmd) for h in hp_list]
            + [registry.parse_ref(b, "be", be_cmd) for b in be_list])
    if not dry_run:
        require_gpu(refs)

    system_list = _split(systems) or list(SYSTEM_NAMES)
    for name in system_list:
        make_system(name)  # unknown names fail here, before any run
    try:
        load_list = [float(x) for x in _split(loads)] or (QUICK["loads"] if quick else [0.5])
    except ValueError:
        raise TallyError(f"--load takes numbers, got {', '.join(loads)}") from None
    if duration is None:
        duration = QUICK["duration"] if quick else PAPER_DURATION if paper else 20.0
    if trace_path and not Path(trace_path).is_file():
        raise TallyError(f"trace file {trace_path} does not exist")
    out = Path(out_dir or f"benchmarks/results/bench-{_dt.date.today().isoformat()}")

    from tally.bench.runner import BenchConfig, Runner

    config = BenchConfig(
        out_dir=out, duration_s=duration, arrival_source="azure" if trace_path else arrival_source,
        trace_path=trace_path, trace_function=trace_function, trace_window=_parse_window(trace_window), seed=seed,
        mps_split_percent=mps_split_percent, hp_command=hp_cmd, be_command=be_cmd,
        hp_options=list(hp_option), be_options=list(be_option), reuse_workers=reuse,
    )
    if quick:
        # per-run startup measured on an H100 (2026-11-25): BE model build ~11 s + warm-up 1-5 s is
        # the critical path; warm-up needs the one-time costs (first steps: cuDNN autotuning,
        # allocator growth, lazy module loads) behind it, not a fixed second of steady state
        config.capacity_s, config.warmup_s, config.warmup_steps, config.startup_estimate_s = 2.0, 0.5, 3, 15.0
    if all(r.fake for r in refs):
        # CPU fakes need no warm-up and have no GPU to sample: keep test runs short
        config.startup_estimate_s, config.warmup_s, config.capacity_s, config.sample_gpu = 0.5, 0.1, 0.5, False
    if trace_path:
        from tally.bench.traces import load_azure_csv

        load_azure_csv(trace_path).function_arrivals(trace_function)  # malformed trace: fail before any run

    keys = build_plan([r.text for r in refs[:len(hp_list)]], [r.text for r in refs[len(hp_list):]],
                      system_list, load_list, paper)
    parsed_part = _parse_part(part)
    if parsed_part:
        index, count = parsed_part
        keys = keys[index - 1::count]
    runner = Runner(config)
    overheads = runner.overheads()
    estimate = runner.plan_seconds(keys, overheads)
    click.echo(f"tally bench: {len(keys)} runs ({len(set((k.hp, k.be, k.load) for k in keys))} (pair, load) x "
               f"{len(system_list)} systems), "
               f"{duration:g} s each; estimated {estimate / 60:.1f} min from scratch; output {out}", err=True)
    if dry_run:
        starts = ", ".join(f"{ref} {overheads.startup(ref):.1f} s"
                           for ref in dict.fromkeys([k.hp for k in keys] + [k.be for k in keys]))
        click.echo(f"per-run overheads: {overheads.source}; worker startup (build + warm-up): {starts}; "
                   f"teardown {overheads.teardown_s:.1f} s; "
                   + (f"workers reused (per-window gap {overheads.window_gap_s:.1f} s)" if runner.reuse_possible(keys)
                      else "one process pair per run"), err=True)
    if dry_run:
        for key in keys:
            click.echo(key.run_id)
        return
    _run_with_progress(runner, keys, estimate)
    from tally.bench.report import write_report

    report = write_report(out)
    click.echo(f"wrote {report}")


def _combine(ctx: click.Context, dirs: tuple[str, ...], out_dir: str | None) -> None:
    from click.core import ParameterSource

    from tally.bench.report import combine_runs, combined_markdown

    # any other option would run something or mean another output; refuse rather than ignore it
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    given = ["/".join(param.opts + param.secondary_opts) for param in ctx.command.params
             if param.name not in ("combine", "out_dir") and ctx.get_parameter_source(param.name) in typed]
    if given:
        raise TallyError(f"--combine only reads finished output dirs; it does not go with {', '.join(given)}")
    if len(dirs) < 2:
        raise TallyError("--combine needs two or more output dirs (repeat it: --combine DIR1 --combine DIR2)")
    text = combined_markdown(combine_runs(dirs))
    click.echo(text, nl=False)
    if out_dir:
        path = Path(out_dir) / "combined.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        click.echo(f"wrote {path}", err=True)


def _run_with_progress(runner, keys, estimate_s: float) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        task = progress.add_task("starting", total=len(keys))
        runner.say = lambda message: progress.update(task, description=message)

        def on_done(key, summary, seconds):
            status = summary.get("status")
            if status == "unavailable":
                console.print(f"{key.run_id}: not run ({summary.get('reason', '')})")
            elif status != "ok":
                console.print(f"{key.run_id}: {status}: {summary.get('reason', '')}")
            progress.advance(task)

        try:
            runner.run_matrix(keys, on_done=on_done)
        except KeyboardInterrupt:
            console.print("interrupted: every process and daemon of the run was stopped; "
                          "rerun the same command to resume")
            raise click.exceptions.Abort() from None


def _print_list() -> None:
    from tally.bench import workloads as registry
    from tally.bench.systems import SYSTEM_NAMES, make_system

    click.echo("workloads (NAME[@VARIANT]; first variant is the default):")
    for name, spec in registry.REGISTRY.items():
        click.echo(f"  {name:18s} {spec.kind:5s} batch {spec.batch_size:<3d} {spec.precision:9s} "
                   f"{'/'.join(spec.variants):22s} {spec.summary}")
    click.echo("systems:")
    for name in SYSTEM_NAMES:
        system = make_system(name)
        reason = system.unavailable_reason()
        click.echo(f"  {name:14s} {system.description}" + (f"  [{reason}]" if reason else ""))
