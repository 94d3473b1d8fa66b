"""`tally trace`: record every kernel a program runs, and summarize recordings.

Recording: the agent writes one raw JSON-lines file per CUDA process
(trace-<pid>.jsonl, CUPTI Activity API records) and one stats file
(stats-<pid>.json, launch counts from the callback API) into a scratch
directory; after the program exits they are merged into one trace with
demangled kernel names.

Trace format (JSON lines, one object per line, `type` first):
  {"type": "meta", "version": 1, "command": [...], "date": ..., "exit_code": ...}
  {"type": "kernel", "pid", "name" (demangled), "mangled", "grid": [x,y,z],
   "block": [x,y,z], "static_smem", "dynamic_smem", "registers", "device",
   "context", "stream", "correlation", "start_ns", "end_ns", "duration_ns"}
  {"type": "graph_launch", "pid", "correlation", "graph_exec", "stream"}
  {"type": "process", "pid", "active", "failopen_reason", "kernel_launches",
   "graph_launches", "by_entry_point": {...}, "trace_dropped"}

Kernel durations from a trace seed the scheduler's per-kernel profiles
(`kernel_profiles`; `tally profiles seed TRACE` writes the traced program's
profile file, see tally.profiles and docs/scheduling.md).
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import click

from tally.errors import TallyError
from tally.launcher import agent_env

TRACE_VERSION = 1
HISTOGRAM_EDGES_NS = (10_000, 100_000, 1_000_000, 10_000_000)  # 10 us, 100 us, 1 ms, 10 ms


@lru_cache(maxsize=1)
def _cxxfilt():
    """The demangler, or None (one warning) when the cxxfilt package is missing: a trace with
    mangled names is still a trace, and the program has already run."""
    try:
        import cxxfilt
    except ImportError:
        click.echo("tally: warning: the cxxfilt package is missing (pip install cxxfilt); "
                   "kernel names are left mangled", err=True)
        return None
    return cxxfilt


@lru_cache(maxsize=None)
def demangle(name: str) -> str:
    if not name.startswith("_Z"):
        return name
    cxxfilt = _cxxfilt()
    if cxxfilt is None:
        return name
    try:
        return cxxfilt.demangle(name)
    except Exception:  # noqa: BLE001 - a name the demangler rejects (InvalidName or worse) stays as is
        return name


# ---------------------------------------------------------------- recording


def run_and_forward_signals(command: list[str], env: dict[str, str]) -> int:
    """Run `command` as a child, forwarding SIGINT/SIGTERM/SIGHUP; return a
    shell-style exit status (128+N when the child died of signal N)."""
    try:
        child = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        from tally.launcher import NotFound

        raise NotFound(command[0]) from None
    except OSError as exc:
        raise TallyError(f"cannot run {command[0]}: {exc.strerror}") from exc

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - rc if rc < 0 else rc


def merge_raw_trace(raw_dir: Path, out, command: list[str], exit_code: int) -> dict:
    """Merge the agent's per-process files from raw_dir into `out` (a text file)."""
    meta = {
        "type": "meta",
        "version": TRACE_VERSION,
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exit_code": exit_code,
    }
    out.write(json.dumps(meta) + "\n")
    counts = {"kernels": 0, "graph_launches": 0, "processes": 0, "unreadable_lines": 0}
    for path in sorted(glob.glob(str(raw_dir / "trace-*.jsonl"))):
        pid = int(Path(path).stem.split("-")[1])
        with open(path, encoding="utf-8", errors="replace") as raw:
            for line in raw:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # A process killed mid-write leaves a torn last line.
                    counts["unreadable_lines"] += 1
                    continue
                rec["pid"] = pid
                if rec.get("type") == "kernel":
                    rec["mangled"] = rec["name"]
                    rec["name"] = demangle(rec["name"])
                    rec["duration_ns"] = rec["end_ns"] - rec["start_ns"]
                    counts["kernels"] += 1
                elif rec.get("type") == "graph_launch":
                    counts["graph_launches"] += 1
                out.write(json.dumps(rec) + "\n")
    for path in sorted(glob.glob(str(raw_dir / "stats-*.json"))):
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        stats["type"] = "process"
        out.write(json.dumps(stats) + "\n")
        counts["processes"] += 1
    return counts


def record(command: list[str], output: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="tally-trace-") as raw:
        env = agent_env(command)
        env["TALLY_TRACE_DIR"] = raw
        env["TALLY_STATS_DIR"] = raw
        exit_code = run_and_forward_signals(command, env)
        tmp = output.with_name(output.name + ".partial")
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as out:
                counts = merge_raw_trace(Path(raw), out, command, exit_code)
            tmp.replace(output)
        except OSError as exc:
            raise TallyError(f"cannot write trace {output}: {exc.strerror or exc}") from None
    click.echo(
        f"tally: traced {counts['kernels']} kernels and {counts['graph_launches']} graph launches "
        f"in {counts['processes']} CUDA process(es) -> {output}",
        err=True,
    )
    if counts["processes"] == 0:
        click.echo("tally: warning: no CUDA process reported in; did the program use the GPU?", err=True)
    return exit_code


# ---------------------------------------------------------------- reading


def read_trace(path: Path) -> Iterator[dict]:
    """Records of a trace file; a malformed file is a one-line error."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise TallyError(f"cannot read trace {path}: {exc.strerror}") from exc
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TallyError(f"{path}:{lineno}: not a tally trace line ({exc.msg})") from None
            if not isinstance(rec, dict) or "type" not in rec:
                raise TallyError(f"{path}:{lineno}: not a tally trace record (no 'type')")
            if rec["type"] == "kernel":
                missing = [k for k in ("name", "start_ns", "end_ns") if k not in rec]
                if missing:
                    raise TallyError(f"{path}:{lineno}: kernel record lacks {', '.join(missing)}")
            yield rec


@dataclass
class KernelStats:
    name: str
    mangled: str = ""
    count: int = 0
    total_ns: int = 0
    durations: list[int] = field(default_factory=list)

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


@dataclass
class TraceSummary:
    kernels: dict[str, KernelStats]
    kernel_records: int
    total_ns: int
    kernel_launches: int
    graph_launches: int
    processes: int
    histogram: list[int]  # counts per bucket, edges HISTOGRAM_EDGES_NS
    command: list[str] = field(default_factory=list)  # the traced program (meta record), if known

    def top(self, n: int) -> list[KernelStats]:
        return sorted(self.kernels.values(), key=lambda k: k.total_ns, reverse=True)[:n]


def summarize(records: Iterable[dict]) -> TraceSummary:
    kernels: dict[str, KernelStats] = {}
    histogram = [0] * (len(HISTOGRAM_EDGES_NS) + 1)
    n = total = launches = graphs = processes = 0
    command: list[str] = []
    for rec in records:
        kind = rec["type"]
        if kind == "meta" and isinstance(rec.get("command"), list):
            command = [str(x) for x in rec["command"]]
        elif kind == "kernel":
            dur = int(rec["end_ns"]) - int(rec["start_ns"])
            ks = kernels.get(rec["name"])
            if ks is None:
                ks = kernels[rec["name"]] = KernelStats(rec["name"], str(rec.get("mangled", rec["name"])))
            ks.count += 1
            ks.total_ns += dur
            ks.durations.append(dur)
            histogram[sum(dur >= edge for edge in HISTOGRAM_EDGES_NS)] += 1
            n += 1
            total += dur
        elif kind == "process":
            processes += 1
            launches += int(rec.get("kernel_launches", 0))
            graphs += int(rec.get("graph_launches", 0))
    return TraceSummary(kernels, n, total, launches, graphs, processes, histogram, command)


def block_level(summary: TraceSummary) -> dict[str, str]:
    """Per kernel name: the block-level configuration chosen for it and why, from the traced
    program's records (tally.blocksched): its decisions file (the offline choice) and what the
    agent did in its last `tally run --block-level` (the live directory); {} when it has
    neither. A kernel with offline decisions for several grids has only their number given."""
    if not summary.command:
        return {}
    from tally.blocksched import decisions, live

    entries = decisions.load(decisions.decisions_path(summary.command))
    by_name: dict[str, list] = defaultdict(list)
    for entry in entries:
        by_name[entry.record.name].append(entry.decision)
    directory = live.live_dir(summary.command)
    ran = {k.entry: k for k in live.read(directory)[0]} if directory.is_dir() else {}
    out = {}
    for ks in summary.kernels.values():
        parts = []
        chosen = by_name.get(ks.mangled)
        if chosen and len(chosen) == 1:
            parts.append(chosen[0].reason if chosen[0] else "no decision yet")
        elif chosen:
            parts.append(f"{len(chosen)} configurations, one per grid (tally blocksched show)")
        if ks.mangled in ran:
            parts.append(f"last block-level run: {ran[ks.mangled].describe()}")
        if parts:
            out[ks.name] = " | ".join(parts)
    return out


def kernel_profiles(records: Iterable[dict]) -> dict[tuple[str, tuple, tuple], dict]:
    """Per (mangled name, grid, block): launch count and mean/max duration in ns.
    This is the form the scheduler's duration estimates are seeded from."""
    acc: dict[tuple, list[int]] = defaultdict(list)
    for rec in records:
        if rec["type"] == "kernel":
            key = (rec.get("mangled", rec["name"]), tuple(rec.get("grid", ())), tuple(rec.get("block", ())))
            acc[key].append(int(rec["end_ns"]) - int(rec["start_ns"]))
    return {k: {"count": len(v), "mean_ns": sum(v) / len(v), "max_ns": max(v)} for k, v in acc.items()}


def format_ns(ns: float) -> str:
    """A duration for people: ns, us or ms with sensible precision."""
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def print_summary(summary: TraceSummary, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{summary.kernel_records}[/] kernels executed, {format_ns(summary.total_ns)} of GPU time; "
        f"{summary.kernel_launches} kernel launches and {summary.graph_launches} graph launches "
        f"in {summary.processes} process(es)"
    )
    chosen = block_level(summary)
    table = Table(title=f"Top {top} kernels by GPU time")
    for col, justify in (("kernel", "left"), ("count", "right"), ("total", "right"), ("share", "right"),
                         ("mean", "right"), ("p50", "right"), ("max", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    if chosen:
        table.add_column("block level", justify="left", overflow="fold")
    for ks in summary.top(top):
        d = sorted(ks.durations)
        share = ks.total_ns / summary.total_ns if summary.total_ns else 0
        name = ks.name if len(ks.name) <= 100 else ks.name[:97] + "..."
        row = [name, str(ks.count), format_ns(ks.total_ns), f"{share:.1%}", format_ns(ks.mean_ns),
               format_ns(_percentile(d, 0.5)), format_ns(d[-1])]
        table.add_row(*row, *([chosen.get(ks.name, "-")] if chosen else []))
    console.print(table)
    hist = Table(title="Kernel durations")
    hist.add_column("duration")
    hist.add_column("kernels", justify="right")
    hist.add_column("", justify="left")
    labels = ["< 10 us", "10-100 us", "100 us-1 ms", "1-10 ms", ">= 10 ms"]
    peak = max(summary.histogram) or 1
    for label, count in zip(labels, summary.histogram):
        hist.add_row(label, str(count), "#" * round(40 * count / peak))
    console.print(hist)


def summary_json(summary: TraceSummary, top: int) -> dict:
    chosen = block_level(summary)
    return {
        "kernels_executed": summary.kernel_records,
        "gpu_time_ns": summary.total_ns,
        "kernel_launches": summary.kernel_launches,
        "graph_launches": summary.graph_launches,
        "processes": summary.processes,
        "histogram": dict(zip(["lt_10us", "10us_100us", "100us_1ms", "1ms_10ms", "ge_10ms"], summary.histogram)),
        "top": [
            {"name": k.name, "count": k.count, "total_ns": k.total_ns, "mean_ns": k.mean_ns,
             **({"block_level": chosen[k.name]} if k.name in chosen else {})}
            for k in summary.top(top)
        ],
    }


@click.command(
    "trace",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trace file to write (default: tally-trace.jsonl).")
@click.option("--summary", "summary_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Summarize an existing trace file instead of recording.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="Kernels listed in the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def trace_command(output, summary_file, top, as_json, command):
    """Record every kernel launch of COMMAND, or summarize a trace with --summary.

    \b
    tally trace -o train.jsonl -- python train.py
    tally trace --summary train.jsonl
    """
    if summary_file is not None:
        if command:
            raise TallyError("give either --summary FILE or a command to trace, not both")
        summary = summarize(read_trace(summary_file))
        if as_json:
            click.echo(json.dumps(summary_json(summary, top), indent=2))
        else:
            print_summary(summary, top)
        return 0
    if not command:
        raise TallyError("nothing to trace: give a command after --, e.g. tally trace -- python train.py")
    rc = record(list(command), output or Path("tally-trace.jsonl"))
    sys.stdout.flush()
    return rc
