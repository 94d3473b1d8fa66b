"""SLO mode under a load step, next to a training job (issue 7).

What it shows: a high-priority (HP) inference server runs under
`tally run --priority high --slo-p99-ms X` next to a best-effort (BE) training
job, while its offered load steps 0.25 -> 0.75 -> 0.25 of its standalone
capacity. The daemon's SLO controller (src/tally/daemon/slo.py) should shrink
the BE turnaround budget when HP's p99 latency approaches X and grow it again
when there is room; the same run without `--slo-p99-ms` ("noslo", the daemon's
fixed configured budget; BE runs with `--no-gpu-gate` in both modes, so both
apply a budget) is the comparison. Outputs in --out:

  slo_demo.json   environment, parameters, per mode: every HP request (arrival,
                  start, end), the daemon's status sampled every 0.25 s
                  (budget, SLO state, p99), the BE step times, per-phase summaries
  slo_demo.md     one table per mode and phase, and the chart
  slo_demo.png    top: HP p99 latency per 1 s window, both modes, the SLO line,
                  phases shaded; middle: the BE budget (us, log scale); bottom:
                  BE steps/s per 1 s window, both modes
  raw/<mode>/     worker results and logs (raw/capacity/ too, when measured apart)

Run it on a GPU machine (from the repository root):

    source benchmarks/gpu_env.sh && python3 benchmarks/slo_demo.py --out /tmp/slo

About 4 minutes with the defaults: per mode, `tally up`, both workers' start
(torch import, model build, CUDA-graph capture, short warm-ups), 3 x 20 s of
load, the drain and `tally down`. Do not run it while another tally daemon of
the same user runs: scoreboards are named by user and GPU, not by runtime dir.

Per mode the script:
  1. `python3 -m tally up --policy tally --metrics-port 0` with a private
     TALLY_RUNTIME_DIR (a short path under /tmp: it holds Unix sockets);
  2. starts the HP server, this file's hidden `--serve` subcommand, under
     `tally run --priority high [--slo-p99-ms X] --`: it builds and warms up
     the HP workload and, in the first mode only and before any BE work
     exists, measures its standalone capacity (back-to-back requests for
     --capacity-s seconds); when the first mode is `slo` and no --slo-p99-ms
     is given, that measurement runs in a separate server process first,
     because the target must be on `tally run`'s command line before the
     server starts;
  3. starts the BE trainer, `python3 -m tally.bench.worker --role be`, under
     `tally run --priority best-effort --`;
  4. when both are warm, the server replays open-loop Poisson arrivals whose
     rate steps through the phases (rate = load x capacity, capacity = 1 /
     mean standalone service time; the same arrivals in every mode), serving
     them one at a time in arrival order and reporting each latency to the
     daemon through `tally.slo`; meanwhile this process samples the GPU's
     scoreboard (what `tally status --json` prints) every 0.25 s;
  5. SIGTERM to the trainer (the worker then writes its step times and exits
     0: being stopped is how a trainer ends), `tally down`; on any failure or
     Ctrl-C every child's process group is killed and `tally down --force`
     runs.

The latency held and shown (`--slo-latency`):
  * e2e (default): arrival -> completion, queueing included: what the
    server's clients see. The server reports it with `slo.report(end -
    arrival)` rather than timing the request with `slo.request()`, which
    would see the service time only and hold a latency other than the one
    plotted.
  * service: start -> completion, reported with `with slo.request():`.

The default SLO (without --slo-p99-ms): 1.5 x the standalone p99 of the held
latency, from the capacity measurement. For `service` that is the p99 of the
measured back-to-back service times. For `e2e` the queueing of the load step
must be included, or the target would be unreachable at load 0.75 even on an
idle GPU (an M/G/1 queue at 75% utilization waits several service times at
p99): the script replays the run's own arrivals through a simulated FIFO
single server whose service times are drawn from the measured ones, takes
the p99 per phase and uses the largest (the busiest phase). So the target is
"at most 50% worse than this server alone, in its worst phase"; it is loose
in the light phases, where the controller should give BE more room.

A 1 s window "meets the SLO" if the p99 of the latencies completed in it is
<= the SLO. A window without completions is judged only if some request was
outstanding in it for longer than the SLO (a violation: the server is stuck),
and otherwise skipped; the per-phase fraction counts judged windows only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tally.bench import metrics, traces
from tally.bench.worker import service_times, sleep_until, wait_for_file
from tally.errors import TallyError
from tally.files import write_text_atomic

now = time.monotonic  # CLOCK_MONOTONIC, the clock of the bench worker's timestamps

SCRIPT = Path(__file__).resolve()
MODES = ("slo", "noslo")
LATENCY_KINDS = ("e2e", "service")
SLO_FACTOR = 1.5
STATUS_INTERVAL_S = 0.25
WINDOW_S = 1.0
DRAIN_S = 10.0  # the server stops serving this long after the last phase ends

# files of one server process's directory (the parent and `--serve` share them)
CAPACITY_FILE = "capacity.json"
ARRIVALS_FILE = "arrivals.json"
HP_READY_FILE = "hp_ready.json"
GO_FILE = "go"
HP_RESULT_FILE = "hp.json"
BE_READY_FILE = "be_ready.json"
BE_RESULT_FILE = "be.json"

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 3


# ---------------------------------------------------------------- phases and arrivals (pure)


@dataclass(frozen=True)
class Phase:
    index: int
    load: float      # offered load, a fraction of the server's standalone capacity
    start_s: float   # relative to the go time
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def parse_loads(text: str) -> list[float]:
    """"0.25,0.75,0.25" -> [0.25, 0.75, 0.25]; every load must be a positive number."""
    loads = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"load {part.strip()!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"load {part.strip()!r} must be positive")
        loads.append(value)
    if not loads:
        raise ValueError("no loads given")
    return loads


def make_phases(loads: Sequence[float], phase_s: float) -> list[Phase]:
    if not phase_s > 0:
        raise ValueError(f"phase length must be positive, got {phase_s}")
    return [Phase(i, float(load), i * phase_s, (i + 1) * phase_s) for i, load in enumerate(loads)]


def phase_rates(phases: Sequence[Phase], service_time_s: float) -> list[float]:
    """Requests per second of each phase: load x capacity (capacity = 1 / mean service time)."""
    return [phase.load / service_time_s for phase in phases]


def load_step_arrivals(phases: Sequence[Phase], service_time_s: float, seed: int) -> list[float]:
    """Sorted arrival offsets (s from go): per phase a Poisson process conditioned on
    round(load x duration / service time) arrivals (traces.poisson_arrivals), so
    every phase offers exactly its load and the same seed gives the same trace."""
    out: list[float] = []
    for phase in phases:
        count = traces.target_count(phase.load, service_time_s, phase.duration_s)
        # one independent stream per phase: changing one phase's load leaves the others' arrivals alone
        phase_seed = int(np.random.SeedSequence([seed, phase.index]).generate_state(1)[0])
        offsets = traces.poisson_arrivals(count, phase.duration_s, phase_seed)
        out.extend(float(phase.start_s + x) for x in offsets)
    return sorted(out)


def service_summary(service_s: Sequence[float]) -> dict:
    """Standalone capacity from back-to-back service times (seconds)."""
    values = np.asarray(service_s, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no service times measured")
    return {
        "requests": int(values.size),
        "service_time_s": float(values.mean()),
        "p50_s": float(np.percentile(values, 50)),
        "p99_s": float(np.percentile(values, 99)),
        "capacity_rps": float(1.0 / values.mean()),
    }


def simulate_fifo(offsets: Sequence[float], service_s: Sequence[float], seed: int) -> np.ndarray:
    """End-to-end latencies of a FIFO single server fed `offsets`, service times drawn
    (with replacement) from `service_s`: what the server would see alone."""
    arrivals = np.sort(np.asarray(offsets, dtype=np.float64))
    draws = np.random.default_rng(seed).choice(np.asarray(service_s, dtype=np.float64), size=arrivals.size)
    latencies = np.empty(arrivals.size)
    free = -math.inf
    for i, (arrival, service) in enumerate(zip(arrivals, draws)):
        end = max(arrival, free) + service
        latencies[i] = end - arrival
        free = end
    return latencies


def default_slo_ms(kind: str, phases: Sequence[Phase], offsets: Sequence[float], service_s: Sequence[float],
                   seed: int, factor: float = SLO_FACTOR) -> tuple[float, dict]:
    """(SLO in ms, how it was derived): factor x the standalone p99 of the held latency
    (see the module docstring, "The default SLO")."""
    if kind == "service":
        basis = float(np.percentile(np.asarray(service_s, dtype=np.float64), 99))
        rule = f"{factor:g} x standalone p99 service time (back-to-back capacity measurement)"
        detail: dict = {}
    elif kind == "e2e":
        arrivals = np.sort(np.asarray(offsets, dtype=np.float64))
        latencies = simulate_fifo(arrivals, service_s, seed)
        per_phase = []
        for phase in phases:
            inside = latencies[(arrivals >= phase.start_s) & (arrivals < phase.end_s)]
            per_phase.append(float(np.percentile(inside, 99)) * 1e3 if inside.size else math.nan)
        known = [p for p in per_phase if not math.isnan(p)]
        if not known:
            raise ValueError("no arrivals in any phase: cannot derive an SLO")
        basis = max(known) / 1e3
        rule = (f"{factor:g} x the largest per-phase p99 end-to-end latency of this server alone, simulated "
                "(FIFO single server, these arrivals, measured service times)")
        detail = {"standalone_p99_ms_per_phase": per_phase}
    else:
        raise ValueError(f"unknown latency kind {kind!r}")
    slo = round(factor * basis * 1e3, 2)
    return slo, {"rule": rule, "basis_ms": basis * 1e3, "factor": factor, **detail}


# ---------------------------------------------------------------- series and summaries (pure)


def _latencies(requests: np.ndarray, kind: str) -> np.ndarray:
    """Latency of each (arrival, start, end) row: end - arrival (e2e) or end - start (service)."""
    if requests.size == 0:
        return np.empty(0)
    return requests[:, 2] - (requests[:, 0] if kind == "e2e" else requests[:, 1])


def _as_table(requests: Sequence[Sequence[float]]) -> np.ndarray:
    table = np.asarray(requests, dtype=np.float64)
    return table.reshape(-1, 3) if table.size else np.empty((0, 3))


def window_p99_series(requests: Sequence[Sequence[float]], kind: str, t_end: float,
                      width: float = WINDOW_S, t_start: float = 0.0) -> list[dict]:
    """p99 latency (ms) of the requests *completed* in each window [t0, t0 + width) from
    t_start to t_end (what a monitor sees at that moment); NaN where none completed."""
    table = _as_table(requests)
    lat = _latencies(table, kind)
    ends = table[:, 2]
    out = []
    count = max(0, math.ceil((t_end - t_start) / width - 1e-9))
    for k in range(count):
        t0 = t_start + k * width
        t1 = t0 + width
        inside = lat[(ends >= t0) & (ends < t1)]
        out.append({"t0": t0, "t1": t1, "count": int(inside.size),
                    "p99_ms": float(np.percentile(inside, 99)) * 1e3 if inside.size else math.nan})
    return out


def throughput_series(step_end_times: Sequence[float], start_time: float | None, t_end: float,
                      width: float = WINDOW_S, t_start: float = 0.0) -> list[dict]:
    """BE steps per second in each window, counting the parts of steps at the edges
    (metrics.rate_in_window; `start_time` is when the first step began)."""
    steps = sorted(step_end_times)
    first = start_time if start_time is not None else (steps[0] if steps else t_start)
    out = []
    count = max(0, math.ceil((t_end - t_start) / width - 1e-9))
    for k in range(count):
        t0 = t_start + k * width
        rate = metrics.rate_in_window(steps, first, (t0, t0 + width)) if steps else 0.0
        out.append({"t0": t0, "t1": t0 + width, "steps_per_s": rate})
    return out


def window_compliance(requests: Sequence[Sequence[float]], unserved_arrivals: Sequence[float], kind: str,
                      slo_ms: float, start: float, end: float, width: float = WINDOW_S) -> tuple[int, int]:
    """(judged windows, windows meeting the SLO) among the whole windows of [start, end)
    (see the module docstring for how an empty window is judged)."""
    table = _as_table(requests)
    lat = _latencies(table, kind)
    ends = table[:, 2]
    # when each request's clock started: arrival (e2e) or service start (a request never served has none)
    refs = table[:, 0] if kind == "e2e" else table[:, 1]
    unserved = np.asarray(unserved_arrivals if kind == "e2e" else [], dtype=np.float64)
    slo_s = slo_ms / 1e3
    judged = ok = 0
    for k in range(int((end - start) / width + 1e-9)):
        t0, t1 = start + k * width, start + (k + 1) * width
        inside = lat[(ends >= t0) & (ends < t1)]
        if inside.size:
            judged += 1
            ok += int(np.percentile(inside, 99) <= slo_s)
            continue
        late = bool(np.any((ends >= t1) & (refs < t1) & (t1 - refs > slo_s))) or bool(np.any(t1 - unserved > slo_s))
        judged += int(late)
    return judged, ok


def interval_summary(requests: Sequence[Sequence[float]], arrival_offsets: Sequence[float],
                     be_step_times: Sequence[float], be_start: float | None, samples: Sequence[dict],
                     start: float, end: float, slo_ms: float, kind: str, width: float = WINDOW_S) -> dict:
    """HP latency of the requests that *arrived* in [start, end), window compliance,
    BE throughput and the daemon's budget there. `requests` are (arrival, start, end)
    relative to go, in arrival order; the server is FIFO, so they are the first
    len(requests) of `arrival_offsets` and the rest were never served."""
    table = _as_table(requests)
    offsets = np.sort(np.asarray(arrival_offsets, dtype=np.float64))
    unserved = offsets[len(table):]
    arrived = table[(table[:, 0] >= start) & (table[:, 0] < end)]
    offered = int(np.count_nonzero((offsets >= start) & (offsets < end)))
    e2e = metrics.latency_summary(_latencies(arrived, "e2e"))
    service = metrics.latency_summary(_latencies(arrived, "service"))
    judged, ok = window_compliance(table, unserved, kind, slo_ms, start, end, width)
    steps = sorted(be_step_times)
    be_rate = 0.0
    if steps and end > start:
        be_rate = metrics.rate_in_window(steps, be_start if be_start is not None else steps[0], (start, end))
    budgets = [s["budget_us"] for s in samples if start <= s["t"] < end and s.get("budget_us") is not None]
    states: dict[str, int] = {}
    for s in samples:
        if start <= s["t"] < end and s.get("slo_state"):
            states[s["slo_state"]] = states.get(s["slo_state"], 0) + 1
    return {
        "start_s": start, "end_s": end,
        "offered": offered, "completed": int(len(arrived)), "offered_rps": offered / (end - start) if end > start else math.nan,
        "p50_ms": e2e["p50_ms"], "p99_ms": e2e["p99_ms"], "max_ms": e2e["max_ms"],
        "service_p50_ms": service["p50_ms"], "service_p99_ms": service["p99_ms"],
        "windows_judged": judged, "windows_ok": ok, "windows_ok_frac": ok / judged if judged else math.nan,
        "be_steps_per_s": be_rate,
        "budget_us_median": float(np.median(budgets)) if budgets else math.nan,
        "budget_us_min": float(min(budgets)) if budgets else math.nan,
        "budget_us_max": float(max(budgets)) if budgets else math.nan,
        "slo_states": states,
    }


def phase_summaries(requests: Sequence[Sequence[float]], arrival_offsets: Sequence[float],
                    be_step_times: Sequence[float], be_start: float | None, samples: Sequence[dict],
                    phases: Sequence[Phase], slo_ms: float, kind: str, width: float = WINDOW_S) -> list[dict]:
    """One interval_summary per phase, then one over the whole run (phase "all")."""
    out = []
    for phase in phases:
        row = interval_summary(requests, arrival_offsets, be_step_times, be_start, samples,
                               phase.start_s, phase.end_s, slo_ms, kind, width)
        out.append({"phase": phase.index, "load": phase.load, **row})
    if phases:
        total = sum(p.load * p.duration_s for p in phases) / (phases[-1].end_s - phases[0].start_s)
        row = interval_summary(requests, arrival_offsets, be_step_times, be_start, samples,
                               phases[0].start_s, phases[-1].end_s, slo_ms, kind, width)
        out.append({"phase": "all", "load": total, **row})
    return out


def status_sample(t: float, gpu: dict) -> dict:
    """One status sample from a GPU entry shaped like `tally status --json`'s."""
    slo = gpu.get("slo") or {}
    clients = gpu.get("clients") or []
    be = [c for c in clients if c.get("priority") == "best-effort"]
    hp = [c for c in clients if c.get("priority") == "high"]
    return {
        "t": t,
        "budget_us": gpu.get("turnaround_budget_us"),
        "slo_state": slo.get("state"),
        "slo_target_ms": slo.get("target_ms"),
        "slo_p99_ms": slo.get("p99_ms"),
        "hp_active": gpu.get("hp_active"),
        "be_active": gpu.get("be_active"),
        "be_held_ms": sum(float(c.get("held_ms") or 0.0) for c in be),
        "be_launches": sum(int(c.get("launches") or 0) for c in be),
        "hp_requests": sum(int(c.get("requests") or 0) for c in hp),
    }


def analyze_mode(raw: dict, phases: Sequence[Phase], arrival_offsets: Sequence[float], slo_ms: float, kind: str,
                 width: float = WINDOW_S) -> dict:
    """The per-mode section of slo_demo.json from what the processes of one mode left:
    raw = {"go_time", "hp" (server result), "be" (worker result), "status" [(t, gpu entry)], ...};
    every time becomes seconds since go."""
    go = raw.get("go_time")
    hp = raw.get("hp") or {}
    be = raw.get("be") or {}
    out: dict[str, Any] = {k: raw[k] for k in ("mode", "slo_p99_ms", "commands", "errors") if k in raw}
    if go is None:
        out.update(requests=[], be_step_times=[], status_samples=[], phases=[], series={"latency": [], "be": []})
        return out
    requests = [[a - go, s - go, e - go] for a, s, e in hp.get("requests", [])]
    steps = [t - go for t in be.get("step_end_times", [])]
    be_start = be["measure_start_time"] - go if be.get("measure_start_time") is not None else None
    samples = [status_sample(t - go, entry) for t, entry in raw.get("status", [])]
    t_end = phases[-1].end_s if phases else 0.0
    out.update(
        go_time=go,
        hp_info={k: hp.get(k) for k in ("info", "torch", "warmup", "rewarm", "interrupted", "error") if k in hp},
        be_info={k: be.get(k) for k in ("workload", "info", "warmup", "interrupted", "stopped_by", "error") if k in be},
        requests=[[round(x, 6) for x in r] for r in requests],
        incomplete=len(arrival_offsets) - len(requests),
        be_start=be_start,
        be_step_times=[round(t, 6) for t in steps],
        status_samples=samples,
        phases=phase_summaries(requests, arrival_offsets, steps, be_start, samples, phases, slo_ms, kind, width),
        series={"latency": window_p99_series(requests, kind, t_end, width),
                "be": throughput_series(steps, be_start, t_end, width)},
    )
    return out


# ---------------------------------------------------------------- report (pure) and chart


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render_markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    params = doc.get("parameters", {})
    capacity = doc.get("capacity") or {}
    slo_ms = params.get("slo_p99_ms")
    kind = params.get("slo_latency", "e2e")
    lines = [
        "# SLO mode under a load step",
        "",
        f"{env.get('date') or '?'}, {env.get('gpu') or 'no GPU found'} (driver {env.get('driver') or '?'}), "
        f"torch {env.get('torch') or '?'}.",
        "",
        f"HP `{params.get('hp')}` next to BE `{params.get('be')}`; loads {params.get('loads')} of HP's standalone "
        f"capacity, {_fmt(params.get('phase_s'), 'g')} s each, Poisson arrivals (seed {params.get('seed')}).",
    ]
    if capacity:
        lines.append(f"Standalone capacity: {_fmt(capacity.get('capacity_rps'))} requests/s (mean service "
                     f"{_fmt(capacity.get('service_time_s', math.nan) * 1e3, '.2f')} ms, p99 "
                     f"{_fmt(capacity.get('p99_s', math.nan) * 1e3, '.2f')} ms).")
    lines.append(f"SLO: p99 {kind} latency <= {_fmt(slo_ms, '.2f')} ms ({params.get('slo_rule', 'given')}).")
    lines += [
        "",
        "Modes: `slo` = HP under `tally run --priority high --slo-p99-ms SLO` (the daemon adapts the BE budget); "
        "`noslo` = the same under `tally run --priority high` (the configured budget).",
        f"HP latencies are {'arrival -> completion (queueing included)' if kind == 'e2e' else 'service start -> completion'}"
        " of the requests that arrived in the phase; \"windows <= SLO\" counts the 1 s windows whose p99 met the SLO "
        "(of those judged); BE budget is the daemon's turnaround budget, median over the phase.",
        "",
        "![HP p99 latency, BE budget and BE throughput over time](slo_demo.png)",
        "",
    ]
    for mode, data in doc.get("modes", {}).items():
        lines.append(f"## {mode}")
        lines.append("")
        for error in data.get("errors") or []:
            lines.append(f"**error:** {error}")
            lines.append("")
        rows = data.get("phases") or []
        if not rows:
            lines += ["no measurements", ""]
            continue
        lines.append("| phase | load | offered rps | done / offered | HP p50 ms | HP p99 ms | service p99 ms "
                     "| windows <= SLO | BE steps/s | BE budget us |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            windows = (f"{row['windows_ok']}/{row['windows_judged']} ({_fmt(row['windows_ok_frac'] * 100, '.0f')}%)"
                       if row.get("windows_judged") else "-")
            lines.append(
                f"| {row['phase']} | {_fmt(row['load'], '.2f')} | {_fmt(row['offered_rps'])} "
                f"| {row['completed']}/{row['offered']} | {_fmt(row['p50_ms'], '.2f')} | {_fmt(row['p99_ms'], '.2f')} "
                f"| {_fmt(row['service_p99_ms'], '.2f')} | {windows} | {_fmt(row['be_steps_per_s'], '.2f')} "
                f"| {_fmt(row['budget_us_median'], '.0f')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_chart(doc: dict, path: Path) -> Path:
    """slo_demo.png: HP p99 per window (both modes, SLO line), BE budget (log), BE steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = doc.get("parameters", {})
    phases = [Phase(**p) for p in params.get("phases", [])]
    slo_ms = params.get("slo_p99_ms")
    modes = doc.get("modes", {})
    colors = {"slo": "tab:blue", "noslo": "tab:red"}
    fig, (ax_lat, ax_budget, ax_be) = plt.subplots(3, 1, figsize=(11, 9), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 2, 2]})
    for ax in (ax_lat, ax_budget, ax_be):
        for phase in phases:
            ax.axvspan(phase.start_s, phase.end_s, color="0.85" if phase.index % 2 else "0.93", zorder=0)
        ax.grid(True, alpha=0.3)
    for phase in phases:
        ax_lat.text((phase.start_s + phase.end_s) / 2, 1.01, f"load {phase.load:g}", transform=ax_lat.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9)
    any_latency = False
    for mode, data in modes.items():
        color = colors.get(mode)
        series = data.get("series") or {}
        lat = series.get("latency") or []
        xs = [(w["t0"] + w["t1"]) / 2 for w in lat]
        ys = [w["p99_ms"] if w["p99_ms"] is not None else math.nan for w in lat]
        if any(not math.isnan(y) for y in ys):
            any_latency = True
            ax_lat.plot(xs, ys, marker=".", color=color, label=f"{mode}: p99 per {WINDOW_S:g} s")
        be = series.get("be") or []
        ax_be.plot([(w["t0"] + w["t1"]) / 2 for w in be], [w["steps_per_s"] for w in be], marker=".", color=color,
                   label=mode)
        samples = [s for s in data.get("status_samples") or [] if s.get("budget_us")]
        if samples:
            ax_budget.step([s["t"] for s in samples], [s["budget_us"] for s in samples], where="post", color=color,
                           linestyle="-" if mode == "slo" else "--", label=f"{mode} budget")
    if slo_ms:
        ax_lat.axhline(slo_ms, color="black", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    if any_latency:
        ax_lat.set_yscale("log")
    kind = params.get("slo_latency", "e2e")
    ax_lat.set_ylabel(f"HP p99 {kind} latency (ms)")
    if ax_lat.get_legend_handles_labels()[0]:
        ax_lat.legend(loc="upper left", fontsize=8)
    ax_budget.set_yscale("log")
    ax_budget.set_ylabel("BE budget (us)")
    if ax_budget.get_legend_handles_labels()[0]:
        ax_budget.legend(loc="upper left", fontsize=8)
    ax_be.set_ylabel("BE steps/s")
    ax_be.set_xlabel("time since the start of the load (s)")
    ax_be.set_ylim(bottom=0)
    if ax_be.get_legend_handles_labels()[0]:
        ax_be.legend(loc="upper left", fontsize=8)
    if phases:
        ax_be.set_xlim(phases[0].start_s, phases[-1].end_s)
    fig.suptitle(f"tally SLO mode: HP {params.get('hp', '?')} next to BE {params.get('be', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def clean_json(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- the HP server (--serve, runs under tally run)


def measure_service_times(workload, seconds: float, min_requests: int = 20) -> list[float]:
    """Back-to-back requests for `seconds` (at least `min_requests`): the standalone service times."""
    return service_times(workload, seconds, min_requests)[0]


def serve_open_loop(workload, offsets: Sequence[float], go: float, deadline: float, kind: str,
                    record: list) -> None:
    """Request i is due at go + offsets[i]; served one at a time in arrival order (a request
    arriving while the server is busy queues) and reported to the daemon."""
    from tally import slo

    for offset in offsets:
        due = go + offset
        if due > now():
            sleep_until(due)
        start = now()
        if start > deadline:
            return  # overloaded past the drain: the rest counts as never served
        if kind == "service":
            with slo.request():
                workload.step()
            end = now()
        else:
            workload.step()
            end = now()
            slo.report(end - due)
        record.append((due, start, end))


def _torch_info() -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    info: dict[str, Any] = {"version": torch.__version__}
    try:
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001 - a nicety for the report
        pass
    return info


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slo_demo.py --serve", description="the HP server of the SLO demo")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dir", required=True, help="the files shared with the parent")
    parser.add_argument("--report", choices=LATENCY_KINDS, default="e2e")
    parser.add_argument("--measure-capacity", action="store_true")
    parser.add_argument("--capacity-only", action="store_true")
    parser.add_argument("--capacity-s", type=float, default=3.0)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--drain-s", type=float, default=DRAIN_S)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)

    from tally.bench import workloads as registry
    from tally.bench.worker import StopRequested, _Signals, warm_up

    signals = _Signals()
    signals.install()
    work = Path(args.dir)
    result: dict[str, Any] = {"pid": os.getpid(), "workload": args.workload, "report": args.report,
                              "clock": "CLOCK_MONOTONIC", "interrupted": False, "error": None}
    record: list = []
    workload = None
    code = EXIT_OK
    try:
        ref = registry.parse_ref(args.workload, role="hp")
        workload = registry.build(ref, "hp", registry.parse_options(args.option))
        result["info"] = registry.workload_info(workload)
        result["torch"] = _torch_info()
        result["warmup"] = warm_up(workload, args.warmup_steps, args.warmup_s)
        if args.measure_capacity:
            service = measure_service_times(workload, args.capacity_s)
            write_text_atomic(work / CAPACITY_FILE, json.dumps(
                {"service_s": service, "time": now(), "info": result["info"], "torch": result["torch"]}))
        if not args.capacity_only:
            arrivals = traces.Arrivals.read(work / ARRIVALS_FILE) if (work / ARRIVALS_FILE).exists() else None
            if arrivals is None:
                wait_for_file(work / ARRIVALS_FILE, args.start_timeout_s, "the arrivals file")
                arrivals = traces.Arrivals.read(work / ARRIVALS_FILE)
            # the server may have idled while the trainer started: caches and clocks back up first
            result["rewarm"] = warm_up(workload, 3, 0.3)
            write_text_atomic(work / HP_READY_FILE, json.dumps({"pid": os.getpid(), "time": now()}))
            go = wait_for_file(work / GO_FILE, args.start_timeout_s)
            result["go_time"] = go
            result["offered"] = len(arrivals.offsets_s)
            serve_open_loop(workload, arrivals.offsets_s, go, go + arrivals.duration_s + args.drain_s,
                            args.report, record)
    except StopRequested as stop:
        result["interrupted"] = True
        result["stopped_by"] = str(stop)
        code = EXIT_INTERRUPTED
    except TallyError as exc:
        result["error"] = str(exc)
        code = EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the parent must get a result file whatever happened
        import traceback

        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = EXIT_ERROR
    signals.disarm()
    result["requests"] = [list(r) for r in record]
    from tally.bench.worker import finish

    finish(result, work / HP_RESULT_FILE, workload, "slo_demo server")
    return code


# ---------------------------------------------------------------- orchestration (the parent)


class RunError(Exception):
    pass


class StatusPoller:
    """Samples the daemon's view of the first GPU every `interval_s` in a thread:
    the scoreboard mapped directly (cheap, exact), found through one `tally status
    --json`; where it cannot be opened, `tally status --json` every time."""

    def __init__(self, tally_cmd: list[str], env: dict[str, str], interval_s: float = STATUS_INTERVAL_S):
        self.tally_cmd = tally_cmd
        self.env = env
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict]] = []
        self.source = "none"
        self.errors = 0
        self._board = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status_gpu(self) -> dict | None:
        proc = subprocess.run(self.tally_cmd + ["status", "--json"], env=self.env, capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:
            return None
        gpus = json.loads(proc.stdout).get("gpus") or []
        return gpus[0] if gpus else None

    def start(self) -> None:
        try:
            gpu = self._status_gpu()
        except (OSError, ValueError, subprocess.TimeoutExpired):
            gpu = None
        if gpu and gpu.get("scoreboard"):
            try:
                from tally import scoreboard as sbmod

                self._board = sbmod.Scoreboard.open(gpu["scoreboard"])
                self.source = "scoreboard"
            except (TallyError, OSError, ImportError):
                self._board = None
        if self._board is None:
            self.source = "tally status --json"
        self._thread = threading.Thread(target=self._loop, name="status", daemon=True)
        self._thread.start()

    def _read_board(self) -> dict:
        from tally import scoreboard as sbmod

        board = self._board
        header = board.header()
        return {
            "turnaround_budget_us": header["turnaround_budget_ns"] / 1e3,
            "hp_active": header["hp_active"], "be_active": header["be_active"],
            "slo": {"state": sbmod.SLO_STATE_NAMES.get(board.slo_state, str(board.slo_state)),
                    "target_ms": board.slo_target_ns / 1e6, "p99_ms": board.slo_p99_ns / 1e6},
            "clients": [{"pid": c["pid"], "priority": c["priority_name"], "launches": c["launches"],
                         "held_ms": c["held_ns"] / 1e6, "requests": c["requests"]} for c in board.clients()],
        }

    def _loop(self) -> None:
        next_t = now()
        while not self._stop.is_set():
            t = now()
            try:
                gpu = self._read_board() if self._board is not None else self._status_gpu()
                if gpu is not None:
                    self.samples.append((t, gpu))
            except Exception:  # noqa: BLE001 - a missed sample is a gap in the chart, not a failed run
                self.errors += 1
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - now()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=35)
        if self._board is not None:
            self._board.close()
            self._board = None


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.tally_cmd = shlex.split(args.tally_cmd) if args.tally_cmd else [sys.executable, "-m", "tally"]
        self.phases = make_phases(parse_loads(args.loads), args.phase_s)
        self.capacity: dict | None = None       # {"service_s": [...], ...}
        self.arrivals: traces.Arrivals | None = None
        self.slo_ms: float | None = args.slo_p99_ms
        self.slo_detail: dict = {"rule": "given (--slo-p99-ms)"} if args.slo_p99_ms else {}
        self.hp_torch: dict = {}

    # --- helpers

    def _tally(self, env: dict[str, str], log: Path, *args: str, check: bool = True, timeout: float = 180) -> int:
        with open(log, "a") as f:
            f.write(f"$ tally {' '.join(args)}\n")
            f.flush()
            try:
                proc = subprocess.run(self.tally_cmd + list(args), env=env, stdout=f, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=timeout)
            except subprocess.TimeoutExpired:
                if check:
                    raise RunError(f"`tally {' '.join(args)}` did not finish within {timeout:g} s") from None
                return -1
        if check and proc.returncode != 0:
            from tally.bench.runner import _last_line

            raise RunError(f"`tally {' '.join(args)}` failed (status {proc.returncode}): {_last_line(log)}")
        return proc.returncode

    def _server_argv(self, work: Path, slo_ms: float | None, capacity: bool, capacity_only: bool = False) -> list[str]:
        run = self.tally_cmd + ["run", "--priority", "high"]
        if slo_ms is not None:
            run += ["--slo-p99-ms", f"{slo_ms:g}"]
        argv = run + ["--", sys.executable, str(SCRIPT), "--serve", "--workload", self.args.hp, "--dir", str(work),
                      "--report", self.args.slo_latency, "--start-timeout-s", f"{self.args.start_timeout_s:g}",
                      "--warmup-s", f"{self.args.warmup_s:g}"]
        for option in self.args.hp_option:
            argv += ["--option", option]
        if capacity:
            argv += ["--measure-capacity", "--capacity-s", f"{self.args.capacity_s:g}"]
        if capacity_only:
            argv += ["--capacity-only"]
        return argv

    def _be_argv(self, work: Path) -> list[str]:
        # the launch-level gate in both modes (SLO mode uses it anyway): "noslo" is the fixed budget
        argv = self.tally_cmd + ["run", "--priority", "best-effort", "--no-gpu-gate", "--", sys.executable, "-m",
                                 "tally.bench.worker",
                                 "--role", "be", "--workload", self.args.be, "--result", str(work / BE_RESULT_FILE),
                                 "--ready-file", str(work / BE_READY_FILE), "--warmup-steps", "3",
                                 "--warmup-s", f"{self.args.warmup_s:g}",
                                 "--start-timeout-s", f"{self.args.start_timeout_s:g}"]
        for option in self.args.be_option:
            argv += ["--option", option]
        return argv

    @staticmethod
    def _wait(paths: Sequence[Path], procs: dict[str, Any], timeout_s: float, what: str) -> None:
        """Until every path exists; a process of `procs` that exits first fails the run."""
        from tally.bench.runner import _last_line

        deadline = now() + timeout_s
        while not all(p.exists() for p in paths):
            for name, (proc, log) in procs.items():
                if proc.poll() is not None and not all(p.exists() for p in paths):
                    raise RunError(f"{name} exited (status {proc.returncode}) before {what}: {_last_line(log)}")
            if now() > deadline:
                raise RunError(f"{what} did not happen within {timeout_s:g} s")
            time.sleep(0.05)

    def _set_capacity(self, capacity: dict) -> None:
        self.capacity = capacity
        self.hp_torch = capacity.get("torch") or {}
        summary = service_summary(capacity["service_s"])
        offsets = load_step_arrivals(self.phases, summary["service_time_s"], self.args.seed)
        total = self.phases[-1].end_s
        self.arrivals = traces.Arrivals(
            offsets_s=offsets, duration_s=total, load=sum(p.load for p in self.phases) / len(self.phases),
            service_time_s=summary["service_time_s"], source="poisson-load-step",
            details={"seed": self.args.seed, "phases": [asdict(p) for p in self.phases]})
        if self.slo_ms is None:
            self.slo_ms, self.slo_detail = default_slo_ms(self.args.slo_latency, self.phases, offsets,
                                                          capacity["service_s"], self.args.seed)
        print(f"slo_demo: capacity {summary['capacity_rps']:.1f} requests/s (service mean "
              f"{summary['service_time_s'] * 1e3:.2f} ms, p99 {summary['p99_s'] * 1e3:.2f} ms); "
              f"SLO p99 {self.args.slo_latency} <= {self.slo_ms:g} ms; {len(offsets)} arrivals", flush=True)

    # --- one mode

    def run_mode(self, mode: str) -> dict:
        from tally.bench.runner import ProcessSet, _last_line
        from tally.bench.systems import short_runtime_dir

        work = self.out / "raw" / mode
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        tally_log = work / "tally.log"
        runtime = short_runtime_dir("tslo-")
        env = {**os.environ, "TALLY_RUNTIME_DIR": str(runtime)}
        procs = ProcessSet()
        poller: StatusPoller | None = None
        raw: dict[str, Any] = {"mode": mode, "errors": [], "commands": {}}
        up = False
        try:
            up = True  # a failed `up` may have started something: always `down`
            self._tally(env, tally_log, "up", "--policy", "tally", "--metrics-port", "0")
            hp = None
            if self.capacity is None:
                if mode == "slo" and self.slo_ms is None:
                    # the target must be on `tally run`'s command line: measure in a server of its own first
                    cap_dir = self.out / "raw" / "capacity"
                    shutil.rmtree(cap_dir, ignore_errors=True)
                    cap_dir.mkdir(parents=True)
                    argv = self._server_argv(cap_dir, None, capacity=True, capacity_only=True)
                    raw["commands"]["capacity"] = argv
                    proc = procs.spawn(argv, env, cap_dir / "hp.log")
                    try:
                        code = proc.wait(timeout=self.args.start_timeout_s + self.args.capacity_s + 60)
                    except subprocess.TimeoutExpired:
                        raise RunError("the capacity measurement did not finish in time") from None
                    procs.stop(proc, 0)
                    if code != 0 or not (cap_dir / CAPACITY_FILE).exists():
                        raise RunError(f"the capacity measurement failed (status {code}): {_last_line(cap_dir / 'hp.log')}")
                    self._set_capacity(json.loads((cap_dir / CAPACITY_FILE).read_text()))
                else:
                    # measured by this mode's server itself, before the trainer exists
                    argv = self._server_argv(work, self.slo_ms if mode == "slo" else None, capacity=True)
                    raw["commands"]["hp"] = argv
                    hp = procs.spawn(argv, env, work / "hp.log")
                    self._wait([work / CAPACITY_FILE], {"the HP server": (hp, work / "hp.log")},
                               self.args.start_timeout_s + self.args.capacity_s + 60, "the capacity measurement")
                    self._set_capacity(json.loads((work / CAPACITY_FILE).read_text()))
            assert self.arrivals is not None and self.slo_ms is not None
            raw["slo_p99_ms"] = self.slo_ms if mode == "slo" else None
            self.arrivals.write(work / ARRIVALS_FILE)
            if hp is None:
                argv = self._server_argv(work, self.slo_ms if mode == "slo" else None, capacity=False)
                raw["commands"]["hp"] = argv
                hp = procs.spawn(argv, env, work / "hp.log")
            argv = self._be_argv(work)
            raw["commands"]["be"] = argv
            be = procs.spawn(argv, env, work / "be.log")
            self._wait([work / HP_READY_FILE, work / BE_READY_FILE],
                       {"the HP server": (hp, work / "hp.log"), "the BE trainer": (be, work / "be.log")},
                       self.args.start_timeout_s, "both workers were ready")
            poller = StatusPoller(self.tally_cmd, env)
            poller.start()
            write_text_atomic(work / GO_FILE, json.dumps({"time": now()}))
            raw["go_time"] = now()  # replaced by the server's own go time below
            print(f"slo_demo: {mode}: measuring for {self.phases[-1].end_s:g} s", flush=True)
            try:
                hp.wait(timeout=self.phases[-1].end_s + DRAIN_S + 60)
            except subprocess.TimeoutExpired:
                raw["errors"].append("the HP server did not finish in time; killed it")
            poller.stop()
            raw["status"] = poller.samples
            raw["status_source"] = poller.source
            procs.stop(hp, 10)
            # SIGTERM is how the bench trainer ends: it writes its step times, exits 0
            procs.stop(be, 30, signal.SIGTERM)
            raw["hp"] = self._read_result(work / HP_RESULT_FILE, work / "hp.log", "HP server", raw["errors"])
            raw["be"] = self._read_result(work / BE_RESULT_FILE, work / "be.log", "BE trainer", raw["errors"])
            if raw["hp"].get("go_time") is not None:
                raw["go_time"] = raw["hp"]["go_time"]
            if not raw["hp"].get("torch") and self.hp_torch:
                raw["hp"]["torch"] = self.hp_torch
            self.hp_torch = self.hp_torch or raw["hp"].get("torch") or {}
        finally:
            if poller is not None:
                poller.stop()
            procs.stop_all(10)
            if up:
                if self._tally(env, tally_log, "down", check=False) != 0:
                    self._tally(env, tally_log, "down", "--force", check=False)
            shutil.rmtree(runtime, ignore_errors=True)
        return raw

    @staticmethod
    def _read_result(path: Path, log: Path, what: str, errors: list[str]) -> dict:
        from tally.bench.runner import _last_line

        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            errors.append(f"{what} wrote no result: {_last_line(log)}")
            return {}
        if data.get("error"):
            errors.append(f"{what}: {data['error']}")
        return data

    # --- all of it

    def document(self, raws: dict[str, dict], environment: dict) -> dict:
        offsets = self.arrivals.offsets_s if self.arrivals else []
        capacity = service_summary(self.capacity["service_s"]) if self.capacity else None
        env = dict(environment)
        if self.hp_torch:
            env["torch"] = self.hp_torch.get("version", env.get("torch"))
            env["torch_device"] = self.hp_torch.get("device")
            env["torch_cuda"] = self.hp_torch.get("cuda")
        doc = {
            "environment": env,
            "parameters": {
                "hp": self.args.hp, "be": self.args.be, "hp_options": self.args.hp_option,
                "be_options": self.args.be_option, "phase_s": self.args.phase_s,
                "loads": [p.load for p in self.phases], "phases": [asdict(p) for p in self.phases],
                "modes": list(self.args.modes), "seed": self.args.seed, "slo_p99_ms": self.slo_ms,
                "slo_latency": self.args.slo_latency, "slo_rule": self.slo_detail.get("rule"),
                "slo_derivation": self.slo_detail, "window_s": WINDOW_S, "status_interval_s": STATUS_INTERVAL_S,
                "capacity_s": self.args.capacity_s,
                "rates_rps": phase_rates(self.phases, capacity["service_time_s"]) if capacity else None,
            },
            "capacity": {**capacity, "service_s": self.capacity["service_s"]} if capacity else None,
            "modes": {},
        }
        for mode, raw in raws.items():
            if self.slo_ms is None or not offsets:
                doc["modes"][mode] = {"mode": mode, "errors": raw.get("errors", [])}
                continue
            doc["modes"][mode] = analyze_mode(raw, self.phases, offsets, self.slo_ms, self.args.slo_latency)
            doc["modes"][mode]["status_source"] = raw.get("status_source")
        return clean_json(doc)

    def write_outputs(self, raws: dict[str, dict], environment: dict) -> dict:
        doc = self.document(raws, environment)
        write_text_atomic(self.out / "slo_demo.json", json.dumps(doc, indent=1))
        write_text_atomic(self.out / "slo_demo.md", render_markdown(doc))
        try:
            plot_chart(doc, self.out / "slo_demo.png")
        except ImportError as exc:
            print(f"slo_demo: no chart (matplotlib: {exc})", file=sys.stderr)
        return doc


def _environment() -> dict:
    from importlib import metadata

    from tally.bench.runner import collect_environment

    env = collect_environment()
    try:
        env["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        env["torch"] = None
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = (__doc__ or "").split("\n\n")
    parser = argparse.ArgumentParser(prog="slo_demo.py", description=doc[0],
                                     epilog="Run on a GPU machine: source benchmarks/gpu_env.sh && "
                                            "python3 benchmarks/slo_demo.py --out /tmp/slo")
    parser.add_argument("--out", required=True, help="output directory (slo_demo.json/.md/.png, raw/)")
    parser.add_argument("--hp", default="bert-infer@graph", help="HP inference workload (tally.bench.workloads ref)")
    parser.add_argument("--be", default="resnet50-train", help="BE training workload")
    parser.add_argument("--hp-option", action="append", default=[], metavar="KEY=VALUE", help="HP workload option")
    parser.add_argument("--be-option", action="append", default=[], metavar="KEY=VALUE", help="BE workload option")
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per load phase")
    parser.add_argument("--loads", default="0.25,0.75,0.25", help="offered HP load per phase (fraction of capacity)")
    parser.add_argument("--slo-p99-ms", type=float, default=None,
                        help=f"the HP p99 target (default: {SLO_FACTOR:g} x the standalone p99 of the held latency, "
                             "see the module docstring)")
    parser.add_argument("--slo-latency", choices=LATENCY_KINDS, default="e2e",
                        help="latency the server reports and the SLO holds: e2e = arrival -> completion, "
                             "service = start -> completion")
    parser.add_argument("--modes", default="slo,noslo", help="comma-separated, from: slo, noslo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals")
    parser.add_argument("--capacity-s", type=float, default=3.0, help="standalone capacity measurement length")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="warm-up of each worker")
    parser.add_argument("--start-timeout-s", type=float, default=300.0, help="build + warm-up limit per worker")
    parser.add_argument("--tally-cmd", default=None, help=argparse.SUPPRESS)  # tests: a fake tally CLI
    args = parser.parse_args(argv)
    try:
        loads = parse_loads(args.loads)
    except ValueError as exc:
        parser.error(f"--loads: {exc}")
    if any(load >= 1 for load in loads):
        print("slo_demo: warning: a load >= 1 overloads the server whatever the sharing", file=sys.stderr)
    if not args.phase_s > 0:
        parser.error("--phase-s must be positive")
    if args.slo_p99_ms is not None and not (args.slo_p99_ms > 0 and math.isfinite(args.slo_p99_ms)):
        parser.error("--slo-p99-ms must be a positive number")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        parser.error(f"--modes: a comma-separated list of distinct {', '.join(MODES)} (got {args.modes!r})")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--serve" in argv:
        return serve_main(argv)
    args = parse_args(argv)
    from tally.bench.runner import sigterm_as_interrupt

    demo = Demo(args)
    demo.out.mkdir(parents=True, exist_ok=True)
    environment = _environment()
    raws: dict[str, dict] = {}
    code = EXIT_OK
    with sigterm_as_interrupt():
        try:
            for mode in args.modes:
                print(f"slo_demo: mode {mode}", flush=True)
                try:
                    raws[mode] = demo.run_mode(mode)
                except (RunError, TallyError, OSError, ValueError) as exc:
                    raws[mode] = {"mode": mode, "errors": [str(exc)]}
                    if demo.capacity is None:
                        raise  # nothing later can run without the capacity
                if raws[mode].get("errors"):
                    code = EXIT_ERROR
                    print(f"slo_demo: {mode}: " + "; ".join(raws[mode]["errors"]), file=sys.stderr)
        except KeyboardInterrupt:
            print("slo_demo: interrupted; everything started was stopped", file=sys.stderr)
            code = 130
        except (RunError, TallyError, OSError, ValueError) as exc:
            print(f"slo_demo: error: {exc}", file=sys.stderr)
            code = EXIT_ERROR
        finally:
            if raws:
                demo.write_outputs(raws, environment)
                print(f"slo_demo: wrote {demo.out / 'slo_demo.md'}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
