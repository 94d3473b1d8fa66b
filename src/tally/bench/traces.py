"""Arrival traces for the high-priority (HP) inference server.

Three sources, one output: a sorted list of arrival offsets in seconds within
[0, duration), with exactly `round(load * duration / service_time)` arrivals, so
that the offered load is `load` times the model's standalone capacity.

* Azure Functions 2021 invocation trace (CSV columns app, func, end_timestamp,
  duration; seconds). An invocation's arrival is end_timestamp - duration. One
  function is picked (the busiest by default), a window of it is taken (the
  whole trace by default, e.g. one day), and the window is *compressed*: its
  time axis is scaled onto the run's duration, which keeps the shape of the
  load (diurnal swings, bursts) while the mean rate is then set to the target
  by thinning (too many arrivals) or by superposing randomly shifted copies of
  the window (too few). Both keep the relative rate profile.
* Synthetic bursty: a two-state Markov-modulated Poisson process (calm/burst),
  the shape used when no trace file is supplied; fitted to the target load the
  same way.
* Poisson: the count is fixed to the target, so the arrivals are uniform order
  statistics on [0, duration) (a Poisson process conditioned on its count).

Every malformed input is reported as one-line TallyError.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from tally.errors import TallyError
from tally.files import write_text_atomic

AZURE_COLUMNS = ("app", "func", "end_timestamp", "duration")
SOURCES = ("azure", "bursty", "poisson")


@dataclass
class AzureTrace:
    """Invocations of an Azure Functions trace, as arrival times per function."""

    path: str
    # function key "app/func" -> sorted arrival times (seconds, trace clock)
    arrivals_by_function: dict[str, np.ndarray]

    def busiest_function(self) -> str:
        return max(self.arrivals_by_function, key=lambda k: len(self.arrivals_by_function[k]))

    def function_arrivals(self, function: str | None) -> tuple[str, np.ndarray]:
        """Arrivals of `function` ("app/func", or a bare func hash if unique; None = busiest)."""
        if function is None:
            key = self.busiest_function()
            return key, self.arrivals_by_function[key]
        if function in self.arrivals_by_function:
            return function, self.arrivals_by_function[function]
        matches = [k for k in self.arrivals_by_function if k.split("/", 1)[1] == function]
        if len(matches) == 1:
            return matches[0], self.arrivals_by_function[matches[0]]
        if len(matches) > 1:
            raise TallyError(
                f"trace function {function!r} is ambiguous in {self.path} ({len(matches)} apps have it); "
                "give it as app/func"
            )
        raise TallyError(
            f"trace function {function!r} not found in {self.path} "
            f"({len(self.arrivals_by_function)} functions; the busiest is {self.busiest_function()!r})"
        )


def load_azure_csv(path: str | Path) -> AzureTrace:
    """Parse an Azure Functions 2021 invocation trace; raise TallyError on anything malformed."""
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise TallyError(f"cannot read trace file {path}: {exc.strerror or exc}") from None
    by_function: dict[str, list[float]] = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise TallyError(f"trace file {path} is empty (expected a CSV header {','.join(AZURE_COLUMNS)})") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TallyError(f"trace file {path} is not a CSV file: {exc}") from None
        columns = [c.strip().lower() for c in header]
        missing = [c for c in AZURE_COLUMNS if c not in columns]
        if missing:
            raise TallyError(
                f"trace file {path} lacks column(s) {', '.join(missing)} "
                f"(header has {', '.join(columns) or 'nothing'}; expected {','.join(AZURE_COLUMNS)})"
            )
        index = {c: columns.index(c) for c in AZURE_COLUMNS}
        width = max(index.values()) + 1
        try:
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(row) < width:
                    raise TallyError(f"trace file {path} line {line}: expected {len(columns)} fields, got {len(row)}")
                end = _number(row[index["end_timestamp"]], path, line, "end_timestamp")
                duration = _number(row[index["duration"]], path, line, "duration")
                if duration < 0:
                    raise TallyError(f"trace file {path} line {line}: negative duration {duration}")
                key = f"{row[index['app']].strip()}/{row[index['func']].strip()}"
                by_function.setdefault(key, []).append(end - duration)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TallyError(f"trace file {path} line {reader.line_num}: not valid CSV: {exc}") from None
    if not by_function:
        raise TallyError(f"trace file {path} has a header but no invocations")
    arrays = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in by_function.items()}
    return AzureTrace(path=str(path), arrivals_by_function=arrays)


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TallyError(f"trace file {path} line {line}: {column} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise TallyError(f"trace file {path} line {line}: {column} {text.strip()!r} is not finite")
    return value


def select_window(arrivals: np.ndarray, start_s: float | None, length_s: float | None) -> tuple[np.ndarray, float, float]:
    """Arrivals within [start, start+length) (trace clock), as offsets from start; returns (offsets, start, length).

    Defaults: start = first arrival, length = the rest of the trace.
    """
    if len(arrivals) == 0:
        raise TallyError("the selected trace function has no invocations")
    first, last = float(arrivals[0]), float(arrivals[-1])
    start = first if start_s is None else float(start_s)
    if length_s is None:
        span = last - start
        # the window is half-open: stretch it a hair so the last arrival is inside
        length = span * (1 + 1e-9) + 1e-12 if span > 0 else 0.0
        inside = arrivals[arrivals >= start]
    else:
        length = float(length_s)
        inside = arrivals[(arrivals >= start) & (arrivals < start + length)]
    if length <= 0:
        raise TallyError(f"trace window has no length (start {start:g} s, length {length:g} s)")
    if len(inside) < 2:
        raise TallyError(
            f"trace window [{start:g}, {start + length:g}) s holds {len(inside)} invocation(s); need at least 2 "
            f"(the function's invocations span {first:g}..{last:g} s)"
        )
    return inside - start, start, length


def target_count(load: float, service_time_s: float, duration_s: float) -> int:
    """Number of requests that offers `load` x standalone capacity over `duration_s`."""
    if not (0 < load):
        raise TallyError(f"load must be positive, got {load}")
    if not (service_time_s > 0):
        raise TallyError(f"service time must be positive, got {service_time_s}")
    if not (duration_s > 0):
        raise TallyError(f"duration must be positive, got {duration_s}")
    return max(1, int(round(load * duration_s / service_time_s)))


def fit_shape(shape_offsets: np.ndarray, shape_length: float, count: int, duration_s: float, seed: int) -> np.ndarray:
    """Scale a trace shape onto [0, duration) and thin/superpose it to exactly `count` arrivals.

    Thinning draws a uniform random subset; superposition adds copies of the
    shape shifted circularly by random offsets (a shifted copy keeps the
    window's rate profile up to the shift, so bursts stay bursts) and then thins.
    """
    if shape_length <= 0:
        raise TallyError("trace shape has zero length")
    rng = np.random.default_rng(seed)
    base = np.asarray(shape_offsets, dtype=np.float64) / shape_length * duration_s
    base = base[(base >= 0) & (base < duration_s)]
    if len(base) == 0:
        raise TallyError("trace shape has no arrivals inside its window")
    extra_copies = max(0, math.ceil(count / len(base)) - 1)
    shifts = rng.uniform(0, duration_s, size=extra_copies)
    pool = np.concatenate([base] + [np.mod(base + shift, duration_s) for shift in shifts])
    chosen = rng.choice(len(pool), size=count, replace=False)
    return np.sort(pool[chosen])


def poisson_arrivals(count: int, duration_s: float, seed: int) -> np.ndarray:
    """A Poisson process on [0, duration) conditioned on `count` arrivals."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(0.0, duration_s, size=count))


@dataclass(frozen=True)
class BurstyShape:
    """Two-state Markov-modulated Poisson process: calm and burst, exponential dwell times.

    Defaults: bursts at 2x the mean rate for 20% of the time, calm periods at
    the rate that keeps the mean (0.75x); mean dwell 0.5 s in a burst, 2 s
    calm (the ratio sets the burst fraction). At load 0.5 a burst offers the
    server its full capacity, at 0.75 it overloads it by half: queues build and
    drain as in the Azure trace. Dwell times are given for a "reference" run of
    60 s and scaled with the duration, so a short run still sees several bursts.
    """

    burst_factor: float = 2.0
    burst_fraction: float = 0.2
    mean_burst_dwell_s: float = 0.5
    reference_duration_s: float = 60.0

    def calm_factor(self) -> float:
        return (1.0 - self.burst_fraction * self.burst_factor) / (1.0 - self.burst_fraction)


def bursty_arrivals(count: int, duration_s: float, seed: int, shape: BurstyShape = BurstyShape()) -> np.ndarray:
    """Synthetic bursty arrivals (MMPP shape), fitted to exactly `count` arrivals on [0, duration)."""
    if shape.burst_fraction * shape.burst_factor >= 1.0:
        raise TallyError("bursty shape: burst_fraction x burst_factor must be < 1")
    rng = np.random.default_rng(seed)
    scale = duration_s / shape.reference_duration_s
    burst_dwell = shape.mean_burst_dwell_s * scale
    calm_dwell = burst_dwell * (1.0 - shape.burst_fraction) / shape.burst_fraction
    mean_rate = count / duration_s
    rates = {True: mean_rate * shape.burst_factor, False: mean_rate * shape.calm_factor()}
    # generate 3x the needed count so thinning to `count` keeps the shape
    oversample = 3.0
    t, in_burst = 0.0, bool(rng.random() < shape.burst_fraction)
    out: list[np.ndarray] = []
    while t < duration_s:
        dwell = rng.exponential(burst_dwell if in_burst else calm_dwell)
        end = min(t + dwell, duration_s)
        n = rng.poisson(rates[in_burst] * oversample * (end - t))
        out.append(rng.uniform(t, end, size=n))
        t, in_burst = end, not in_burst
    pool = np.concatenate(out) if out else np.empty(0)
    if len(pool) == 0:
        pool = rng.uniform(0, duration_s, size=1)
    return fit_shape(pool, duration_s, count, duration_s, seed + 1)


@dataclass
class Arrivals:
    """What the HP worker replays, and how it was made (stored next to every result)."""

    offsets_s: list[float]
    duration_s: float
    load: float
    service_time_s: float
    source: str
    details: dict = field(default_factory=dict)

    @property
    def mean_rate(self) -> float:
        return len(self.offsets_s) / self.duration_s

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "load": self.load,
            "duration_s": self.duration_s,
            "service_time_s": self.service_time_s,
            "count": len(self.offsets_s),
            "details": self.details,
            "offsets_s": [round(x, 7) for x in self.offsets_s],
        }

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json()))

    @classmethod
    def read(cls, path: str | Path) -> "Arrivals":
        try:
            data = json.loads(Path(path).read_text())
            offsets = [float(x) for x in data["offsets_s"]]
            return cls(
                offsets_s=offsets,
                duration_s=float(data["duration_s"]),
                load=float(data["load"]),
                service_time_s=float(data["service_time_s"]),
                source=str(data["source"]),
                details=dict(data.get("details", {})),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TallyError(f"cannot read arrivals file {path}: {exc}") from None


def make_arrivals(
    source: str,
    load: float,
    service_time_s: float,
    duration_s: float,
    seed: int = 0,
    trace: AzureTrace | None = None,
    trace_function: str | None = None,
    window_start_s: float | None = None,
    window_length_s: float | None = None,
) -> Arrivals:
    """Arrivals offering `load` x capacity (capacity = 1 / service_time) for `duration_s` seconds."""
    count = target_count(load, service_time_s, duration_s)
    details: dict = {"seed": seed}
    if source == "azure":
        if trace is None:
            raise TallyError("source 'azure' needs a trace file (--trace FILE)")
        key, arrivals = trace.function_arrivals(trace_function)
        offsets, start, length = select_window(arrivals, window_start_s, window_length_s)
        result = fit_shape(offsets, length, count, duration_s, seed)
        details.update(
            trace=trace.path, function=key, window_start_s=start, window_length_s=length,
            invocations_in_window=int(len(offsets)), compression=length / duration_s,
        )
    elif source == "bursty":
        shape = BurstyShape()
        result = bursty_arrivals(count, duration_s, seed, shape)
        details.update(shape=shape.__dict__)
    elif source == "poisson":
        result = poisson_arrivals(count, duration_s, seed)
    else:
        raise TallyError(f"unknown arrival source {source!r} (one of {', '.join(SOURCES)})")
    return Arrivals(
        offsets_s=[float(x) for x in result], duration_s=duration_s, load=load,
        service_time_s=service_time_s, source=source, details=details,
    )


def coefficient_of_variation(offsets: Iterable[float]) -> float:
    """CV of inter-arrival gaps: 1 for Poisson, > 1 for bursty traffic."""
    gaps = np.diff(np.sort(np.asarray(list(offsets), dtype=np.float64)))
    if len(gaps) < 2 or gaps.mean() == 0:
        return float("nan")
    return float(gaps.std() / gaps.mean())
