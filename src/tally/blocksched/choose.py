"""Which configuration a best-effort kernel runs as: a pure function of measurements.

Per measured candidate (see `candidates`):

* speed = original time / candidate time (for the same original grid);
* turnaround, how long a high-priority kernel could wait behind it:
    slice        the measured slice time when recorded, else time / number of slices;
    preemptible  the measured p99 preemption latency when recorded, else the
                 paper's estimate, time / waves / 2 (waves = original blocks per worker);
    ptb          the whole kernel time (it cannot be preempted);
    original     the whole kernel time.

The chosen configuration is the fastest whose turnaround is within the bound
(default 0.1 ms). Following the paper, speed thresholds step down from 1.0 by
0.1; the first threshold some in-bound candidate meets wins, so the choice is
the fastest in-bound candidate, and among those as fast the one with the
smallest turnaround (then: original, preemptible, slice, ptb; then the smaller
size). The steps stop at a configurable floor (default 0.5; the paper went down
to 0.1): when no in-bound candidate keeps at least that fraction of the
original's speed, the kernel runs as the original (and the launch-level gate
still applies to it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tally.blocksched.candidates import MODES, ORIGINAL, Candidate, parse_config
from tally.errors import TallyError
from tally.ptx import abi

DEFAULT_BOUND_NS = 100_000.0  # the paper's default maximum preemption latency (0.1 ms)
DEFAULT_FLOOR = 0.5
THRESHOLD_STEP = 0.1
_EPS = 1e-9

_PREFERENCE = {ORIGINAL: 0, "preemptible": 1, "slice": 2, "ptb": 3}


@dataclass(frozen=True)
class Measurement:
    """What profiling one configuration of one (kernel, grid) recorded, while HP was idle."""

    config: str  # a candidate key: original, slice:N, ptb:W, preemptible:W
    time_ns: float  # mean duration of one whole original launch (all its slices)
    samples: int = 1
    slice_ns: float | None = None  # slices: measured duration of one slice (e.g. its p99)
    preempt_p99_ns: float | None = None  # preemptible: measured p99 preemption latency

    def __post_init__(self):
        parse_config(self.config)
        for name in ("time_ns", "slice_ns", "preempt_p99_ns"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ValueError(f"samples must be a positive integer, got {self.samples!r}")


@dataclass(frozen=True)
class KernelRecord:
    """Everything the choice for one (kernel, grid, block) rests on."""

    name: str  # mangled kernel name
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    num_sms: int
    has_ptx: bool = True
    refusals: dict[str, str] = field(default_factory=dict)  # mode -> tally.ptx's reason
    measurements: tuple[Measurement, ...] = ()

    def measurement(self, config: str) -> Measurement | None:
        return next((m for m in self.measurements if m.config == config), None)


@dataclass(frozen=True)
class Policy:
    bound_ns: float = DEFAULT_BOUND_NS
    floor: float = DEFAULT_FLOOR

    def __post_init__(self):
        if not (math.isfinite(self.bound_ns) and self.bound_ns > 0):
            raise TallyError(f"the turnaround bound must be positive, got {self.bound_ns}")
        if not (0 < self.floor <= 1):
            raise TallyError(f"the speed floor must be in (0, 1], got {self.floor}")

    def thresholds(self) -> list[float]:
        """1.0, 0.9, ... down to the floor (the floor itself is the last step)."""
        steps, k = [], 0
        while True:
            t = round(1.0 - k * THRESHOLD_STEP, 10)
            if t < self.floor - _EPS:
                break
            steps.append(t)
            k += 1
        if not steps or abs(steps[-1] - self.floor) > _EPS:
            steps.append(self.floor)
        return steps


@dataclass(frozen=True)
class Evaluated:
    """One measured candidate, as the choice sees it."""

    candidate: Candidate
    speed: float
    turnaround_ns: float
    turnaround_kind: str  # "slice time", "measured slice time", "est. preemption", "measured p99 preemption", "kernel time"

    def within(self, bound_ns: float) -> bool:
        return self.turnaround_ns <= bound_ns * (1 + _EPS)

    def summary(self, grid, bound_ns: float | None = None) -> str:
        text = f"{self.candidate.describe(grid)}: {self.speed:.2f}x speed, {self.turnaround_kind} {fmt_ns(self.turnaround_ns)}"
        if bound_ns is not None:
            text += f" {'<=' if self.within(bound_ns) else '>'} {fmt_ns(bound_ns)}"
        return text


@dataclass(frozen=True)
class Decision:
    config: str  # the chosen candidate's key
    reason: str  # one line, starts with the configuration
    speed: float | None = None  # vs the original (None: not measured)
    turnaround_ns: float | None = None
    bound_ns: float = DEFAULT_BOUND_NS
    floor: float = DEFAULT_FLOOR

    @property
    def candidate(self) -> Candidate:
        return parse_config(self.config)


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 10e3:
        return f"{ns / 1e3:.0f} us"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e3:.2f} us"


def evaluate(record: KernelRecord) -> list[Evaluated]:
    """Every measured candidate that applies to this record, in measurement order.
    Candidates of a refused mode, or that do not fit the grid, are left out."""
    original = record.measurement(ORIGINAL)
    if original is None:
        return []
    total = abi.total_blocks(record.grid)
    out = []
    for m in record.measurements:
        c = parse_config(m.config)
        if c.mode in record.refusals or (c.mode != ORIGINAL and not record.has_ptx):
            continue
        if (c.mode == "slice" and c.size >= total) or (c.mode in ("ptb", "preemptible") and c.size > total):
            continue  # not a configuration of this grid
        speed = original.time_ns / m.time_ns
        if c.mode == "slice":
            if m.slice_ns is not None:
                turnaround, kind = m.slice_ns, "measured slice time"
            else:
                turnaround, kind = m.time_ns / c.launches(record.grid), "slice time"
        elif c.mode == "preemptible":
            if m.preempt_p99_ns is not None:
                turnaround, kind = m.preempt_p99_ns, "measured p99 preemption"
            else:
                turnaround, kind = m.time_ns / c.waves(record.grid) / 2, "est. preemption"
        else:
            turnaround, kind = m.time_ns, "kernel time"
        out.append(Evaluated(c, speed, turnaround, kind))
    return out


def _refusal_text(refusals: dict[str, str]) -> str:
    reasons = [refusals[m] for m in MODES if m in refusals]
    if len(set(reasons)) == 1:
        return reasons[0]
    return "; ".join(f"{m}: {refusals[m]}" for m in MODES if m in refusals)


def choose(record: KernelRecord, policy: Policy = Policy()) -> Decision:
    """The configuration `record`'s kernel runs as under `policy`, with its reason."""
    def original(reason: str, ev: Evaluated | None = None) -> Decision:
        return Decision(ORIGINAL, f"{ORIGINAL}: {reason}", ev.speed if ev else None,
                        ev.turnaround_ns if ev else None, policy.bound_ns, policy.floor)

    if not record.has_ptx:
        return original("no PTX")
    if all(mode in record.refusals for mode in MODES):
        return original(f"kernel refused by tally.ptx: {_refusal_text(record.refusals)}")
    total = abi.total_blocks(record.grid)
    if total <= record.num_sms:
        return original(f"grid of {total} blocks fits on {record.num_sms} SMs (no candidates)")
    rows = evaluate(record)
    if not rows:
        return original("not profiled yet")
    bound = fmt_ns(policy.bound_ns)
    in_bound = [r for r in rows if r.within(policy.bound_ns)]
    for threshold in policy.thresholds():
        admitted = [r for r in in_bound if r.speed >= threshold - _EPS]
        if not admitted:
            continue
        best = min(admitted, key=lambda r: (-r.speed, r.turnaround_ns, _PREFERENCE[r.candidate.mode], r.candidate.size))
        if best.candidate.mode == ORIGINAL:
            return original(f"kernel time {fmt_ns(best.turnaround_ns)} <= {bound}", best)
        return Decision(best.candidate.key, best.summary(record.grid, policy.bound_ns), best.speed,
                        best.turnaround_ns, policy.bound_ns, policy.floor)
    floor = f"{policy.floor:g}x"
    if in_bound:
        near = max(in_bound, key=lambda r: r.speed)
        detail = f" (fastest within: {near.summary(record.grid)})"
    else:
        near = min(rows, key=lambda r: r.turnaround_ns)
        detail = f" (shortest turnaround: {near.summary(record.grid)})"
    return original(f"no candidate within {bound} keeps >= {floor} speed{detail}", next(
        (r for r in rows if r.candidate.mode == ORIGINAL), None))
