"""Metric definitions (docs/bench.md, "Metrics", is the prose version of this file).

* HP latency = completion - arrival (queueing included); HP service latency =
  completion - start of service. Summaries: p50/p90/p99/max/mean, in ms.
  Percentiles use linear interpolation between order statistics
  (numpy's default), so p99 of 1,000 requests sits between the 990th and the
  991st smallest latency.
* p99 overhead = p99 shared / p99 standalone - 1 (same workload, same trace).
* HP throughput = completed requests / HP measurement window (first arrival to
  last completion); normalized = shared / standalone.
* BE throughput = training steps per second inside the *common* window (the HP
  measurement window of the same run), counting fractional steps at the
  window's edges by linear interpolation between step completions; normalized
  = shared / standalone (standalone: steps/s over the BE-alone run).
* System throughput = HP normalized + BE normalized (2.0 = both as if alone).
* Scheduler counters (tally systems): the change of each worker's scoreboard
  counters over the measurement window; `be_alone_share` = BE kernels admitted
  alone because their estimate exceeded the budget / BE launches.
* BE transformed fraction (tally systems, from the BE agent's stats file):
  sliced_est_ns / (sliced_est_ns + unsliced_est_ns), the agent's estimated GPU
  time of BE launches admitted under the turnaround budget (an HP client present
  and not idle past unthrottle_after) that ran as block-level slices; counted
  over the BE process's life (a reused worker's covers every window it ran).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def latency_summary(latencies_s: Sequence[float]) -> dict:
    """p50/p90/p99/max/mean in milliseconds; counts; empty input gives NaNs and count 0."""
    values = np.asarray(latencies_s, dtype=np.float64) * 1e3
    out: dict = {"count": int(values.size)}
    if values.size == 0:
        out.update({f"p{q}_ms": math.nan for q in PERCENTILES})
        out.update(max_ms=math.nan, mean_ms=math.nan)
        return out
    for q in PERCENTILES:
        out[f"p{q}_ms"] = float(np.percentile(values, q))
    out["max_ms"] = float(values.max())
    out["mean_ms"] = float(values.mean())
    return out


def hp_request_latencies(requests: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(end-to-end, service) latencies in seconds from (arrival, start, end) triples."""
    if len(requests) == 0:
        return np.empty(0), np.empty(0)
    table = np.asarray(requests, dtype=np.float64)
    arrival, start, end = table[:, 0], table[:, 1], table[:, 2]
    return end - arrival, end - start


def measurement_window(requests: Sequence[Sequence[float]]) -> tuple[float, float]:
    """HP measurement window: first arrival to last completion (monotonic clock seconds)."""
    if len(requests) == 0:
        raise ValueError("no completed HP requests: no measurement window")
    table = np.asarray(requests, dtype=np.float64)
    return float(table[:, 0].min()), float(table[:, 2].max())


def rate_in_window(event_times: Sequence[float], start_time: float, window: tuple[float, float]) -> float:
    """Completions per second inside `window`, counting partial steps at both edges.

    `event_times` are sorted step completion times and `start_time` is when the
    first step began. Step i spans (t[i-1], t[i]] (t[-1] = start_time); the
    part of each step that lies inside the window counts in proportion.
    """
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"empty window {window}")
    ends = np.asarray(event_times, dtype=np.float64)
    if ends.size == 0:
        return 0.0
    begins = np.concatenate(([start_time], ends[:-1]))
    spans = ends - begins
    overlap = np.clip(np.minimum(ends, hi) - np.maximum(begins, lo), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        fractions = np.where(spans > 0, overlap / spans, ((ends > lo) & (ends <= hi)).astype(float))
    return float(fractions.sum() / (hi - lo))


def overhead(p99_shared_ms: float, p99_alone_ms: float) -> float:
    """p99 shared / p99 standalone - 1 (0.25 = 25% slower)."""
    if not (p99_alone_ms > 0) or math.isnan(p99_shared_ms):
        return math.nan
    return p99_shared_ms / p99_alone_ms - 1.0


def normalized(shared: float, alone: float) -> float:
    if not (alone > 0) or math.isnan(shared):
        return math.nan
    return shared / alone


def system_throughput(hp_normalized: float, be_normalized: float) -> float:
    return hp_normalized + be_normalized


def mean_utilization(samples: Sequence[Sequence[float]], window: tuple[float, float], column: int = 1) -> float:
    """Mean of one column of (time, utilization %, SM clock MHz, power W) GPU samples inside
    `window` (column 1, utilization, by default); NaN if none or the column is missing."""
    if not samples:
        return math.nan
    width = min(len(s) for s in samples)
    if column >= width:
        return math.nan
    table = np.asarray([s[:width] for s in samples], dtype=np.float64)
    inside = table[(table[:, 0] >= window[0]) & (table[:, 0] <= window[1]), column]
    inside = inside[~np.isnan(inside)]
    if inside.size == 0:
        return math.nan
    return float(inside.mean())


def gpu_state(samples: Sequence[Sequence[float]], window: tuple[float, float]) -> dict:
    """Mean SM clock and power draw inside `window`: a slower clock under sharing (power or
    thermal limits) slows the HP job for reasons no scheduler controls."""
    return {"sm_clock_mhz": mean_utilization(samples, window, 2), "power_w": mean_utilization(samples, window, 3)}


def hp_summary(hp_result: dict) -> dict:
    """Everything the report needs from one HP worker result."""
    requests = hp_result.get("requests", [])
    e2e, service = hp_request_latencies(requests)
    out = {
        "latency": latency_summary(e2e),
        "service": latency_summary(service),
        "offered": int(hp_result.get("offered", len(requests))),
        "completed": len(requests),
        "incomplete": int(hp_result.get("offered", len(requests))) - len(requests),
    }
    if requests:
        window = measurement_window(requests)
        out["window"] = list(window)
        out["throughput_rps"] = len(requests) / (window[1] - window[0]) if window[1] > window[0] else math.nan
    else:
        out["window"] = None
        out["throughput_rps"] = 0.0
    return out


def be_rate(be_result: dict, window: tuple[float, float] | None = None) -> float:
    """BE steps per second in `window` (default: the whole measured run after warm-up)."""
    steps = be_result.get("step_end_times", [])
    start = be_result.get("measure_start_time")
    if not steps or start is None:
        return 0.0
    if window is None:
        window = (float(start), float(steps[-1]))
        if window[1] <= window[0]:
            return 0.0
    return rate_in_window(steps, float(start), window)


SCHEDULER_COUNTERS = ("launches", "graph_launches", "held_ms", "held_launches", "long_kernels", "sliced_launches")


def scheduler_delta(before: dict | None, after: dict | None, pids: dict[str, int]) -> dict | None:
    """Per role, how the scheduler counters of that role's process moved between two snapshots
    ({pid: client} as read from `tally status --json`); None without both snapshots."""
    if not before or not after:
        return None
    out: dict = {}
    for role, pid in pids.items():
        b, a = before.get(pid), after.get(pid)
        if a is None:
            continue
        b = b or {}
        delta = {k: a.get(k, 0) - b.get(k, 0) for k in SCHEDULER_COUNTERS
                 if isinstance(a.get(k), (int, float)) and isinstance(b.get(k, 0), (int, float))}
        delta["failopen"] = bool(a.get("failopen"))
        out[role] = delta
    be = out.get("be")
    if be and be.get("launches"):
        be["be_alone_share"] = be.get("long_kernels", 0) / be["launches"]
    return out or None


BLOCKSCHED_COUNTS = ("plan_kernels", "sliced_launches", "slices", "unsliced_launches", "sliced_est_ns",
                     "unsliced_est_ns")


def blocksched_summary(stats: dict | None) -> dict | None:
    """The block-level counters of an agent stats file (its "blocksched" object), with the BE
    transformed fraction = sliced_est_ns / (sliced_est_ns + unsliced_est_ns): the share of the
    estimated GPU time of BE launches admitted under the turnaround budget that ran as slices
    (None when there was none). None when the stats have no "blocksched" object."""
    block = stats.get("blocksched") if isinstance(stats, dict) else None
    if not isinstance(block, dict):
        return None
    def count(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    out: dict = {name: int(block[name]) if count(block.get(name)) else 0 for name in BLOCKSCHED_COUNTS}
    # whatever else the agent counts (not_in_plan, unusable, ...), its plan, and per-kernel lines
    out.update({k: v for k, v in block.items() if k not in out and count(v)})
    if isinstance(block.get("plan"), str):
        out["plan"] = block["plan"]
    refused = block.get("refused")
    out["refused"] = {str(k): v for k, v in refused.items()} if isinstance(refused, dict) else {}
    if isinstance(block.get("kernels"), list):
        out["kernels"] = block["kernels"][:64]
    total = out["sliced_est_ns"] + out["unsliced_est_ns"]
    out["transformed_fraction"] = out["sliced_est_ns"] / total if total > 0 else None
    return out
