"""SLO mode: adapt the best-effort turnaround budget to a high-priority p99 target.

A high-priority (HP) client started with `tally run --priority high
--slo-p99-ms X` has `slo_p99_ns` in its scoreboard slot. Under policy tally the
daemon then steps `SloController` on every tick (10 ms); the controller reads
each such client's latency signal and sets the header's `turnaround_budget_ns`
(the most estimated BE kernel time the gate admits while HP may need the GPU,
docs/scheduling.md) between `min_budget_ns` and `max_budget_ns`. Nothing here
reads a clock: time comes in with the sample, so tests run it on a simulated
clock.

The signal, per HP client with an SLO (docs/operations.md, "SLO mode"):

* **requests** (exact): latencies the program reports with `tally.slo`,
  a cumulative log-bucketed histogram in its slot's SLO record;
* **busy** (proxy, while it reported none): its GPU busy periods, from the
  first launch after an idle gap (recorded by the agent) to the daemon tick
  that first sees all its tracked work complete with no launch for the idle
  window (`BusyTracker`), bucketed the same way by the daemon.

The loop (every `interval_ns`, 100 ms):

* per client, the p99 over the latencies observed since
  max(now - `window_ns`, the last budget change), when there are at least
  `min_samples` of them (otherwise that client is not judged this time);
* any judged client with p99 > its SLO: budget x= `decrease` (floor
  `min_budget_ns`); every judged client with p99 < `margin` x its SLO (and at
  least one judged): budget += `increase_ns` (cap `max_budget_ns`); else hold.
  Because the window restarts at every change, each decision is taken on
  latencies measured at the current budget only (one change per "round trip").
* no active HP client with an SLO: the configured budget, state "off".

Each client is compared with its own SLO, so with several HP clients the
tightest relative to its latency binds; the SLO status's `slo_target_ns` /
`slo_p99_ns` name the client with the largest p99 / SLO ratio.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tally import scoreboard as sbmod

SOURCE_REQUESTS = "requests"
SOURCE_BUSY = "busy"


@dataclass
class SloParams:
    interval_ns: int = 100_000_000       # the controller acts this often
    window_ns: int = 1_000_000_000       # p99 over at most this much history
    min_samples: int = 10                # latencies needed (since the last change) to judge a client
    margin: float = 0.9                  # p99 below margin x SLO: room to increase
    increase_ns: int = 100_000           # additive increase of the budget per interval
    decrease: float = 0.5                # multiplicative decrease on a violation
    min_budget_ns: int = 10_000          # floor (> 0: a budget of 0 would admit unknown kernels freely)
    max_budget_ns: int = 20_000_000      # cap
    quantile: float = 0.99


@dataclass
class SloClient:
    slo_ns: int
    hist: tuple        # cumulative per-bucket counts (sbmod.SLO_HIST_BUCKETS)
    source: str = SOURCE_REQUESTS


@dataclass
class SloSample:
    """One tick's view: {client key: SloClient} for active HP clients with an SLO;
    a key names one client incarnation, e.g. (slot, pid, claim_ns)."""

    now_ns: int
    clients: dict = field(default_factory=dict)


@dataclass
class SloDecision:
    budget_ns: int         # what to write into turnaround_budget_ns
    state: int             # sbmod.SLO_STATE_*
    target_ns: int         # SLO of the binding client (0 = off)
    p99_ns: int            # its p99 over the evaluated window (0 = not measured)
    source: str = ""       # its signal


class SloController:
    def __init__(self, default_budget_ns: int, params: SloParams | None = None):
        self.p = params or SloParams()
        self.default_budget_ns = default_budget_ns
        self.budget = self._clamp(default_budget_ns)
        self.state = sbmod.SLO_STATE_OFF
        self.target_ns = 0
        self.p99_ns = 0
        self.source = ""
        self._history: dict = {}  # key -> deque[(t, hist)]
        self._last_action: int | None = None
        self._last_change = 0
        self.increases = 0
        self.decreases = 0

    def _clamp(self, budget: int) -> int:
        return max(self.p.min_budget_ns, min(self.p.max_budget_ns, int(budget)))

    def step(self, sample: SloSample) -> SloDecision:
        p = self.p
        now = sample.now_ns
        clients = {k: c for k, c in sample.clients.items() if c.slo_ns > 0}
        if not clients:
            if self.state != sbmod.SLO_STATE_OFF:
                self._reset()
            return self._decision(self.default_budget_ns)
        if self.state == sbmod.SLO_STATE_OFF:
            # SLO mode starts (again) from the configured budget
            self.budget = self._clamp(self.default_budget_ns)
            self.state = sbmod.SLO_STATE_WARMUP
            self._last_change = now
        # a client's history is per signal: its first reported request switches it from the proxy
        live = {(key, c.source) for key, c in clients.items()}
        for hk in list(self._history):
            if hk not in live:
                del self._history[hk]
        for key, c in clients.items():
            h = self._history.setdefault((key, c.source), deque())
            h.append((now, tuple(c.hist)))
            while len(h) > 2 and now - h[1][0] >= p.window_ns + p.interval_ns:
                h.popleft()

        if self._last_action is not None and now - self._last_action < p.interval_ns:
            return self._decision(self.budget)
        self._last_action = now

        since = max(now - p.window_ns, self._last_change)
        judged = []  # (ratio, p99, client)
        for key, c in clients.items():
            counts = self._window_counts(self._history[(key, c.source)], since)
            if counts is None or sum(counts) < p.min_samples:
                continue
            p99 = sbmod.hist_quantile(counts, p.quantile)
            judged.append((p99 / c.slo_ns, p99, c))
        if not judged:
            self.state = sbmod.SLO_STATE_WARMUP
            return self._decision(self.budget)
        ratio, p99, worst = max(judged, key=lambda j: j[0])
        self.target_ns, self.p99_ns, self.source = worst.slo_ns, int(p99), worst.source
        if ratio > 1.0:
            if self.budget <= p.min_budget_ns:
                self.state = sbmod.SLO_STATE_FLOOR
            else:
                self.budget = self._clamp(self.budget * p.decrease)
                self.state = sbmod.SLO_STATE_DECREASE
                self.decreases += 1
                self._last_change = now
        elif ratio < p.margin:
            if self.budget < p.max_budget_ns:
                self.budget = self._clamp(self.budget + p.increase_ns)
                self.increases += 1
                self._last_change = now
            self.state = sbmod.SLO_STATE_INCREASE
        else:
            self.state = sbmod.SLO_STATE_HOLD
        return self._decision(self.budget)

    @staticmethod
    def _window_counts(history: deque, since: int) -> list[int] | None:
        """Bucket counts observed after `since`: newest minus the latest snapshot taken at or
        before `since` (or the oldest one, for a client seen only after it)."""
        if len(history) < 2:
            return None
        end = history[-1][1]
        start = history[0][1]
        for t, hist in history:
            if t > since:
                break
            start = hist
        return [max(0, a - b) for a, b in zip(end, start)]

    def _reset(self) -> None:
        self.state = sbmod.SLO_STATE_OFF
        self.budget = self._clamp(self.default_budget_ns)
        self.target_ns = self.p99_ns = 0
        self.source = ""
        self._history.clear()
        self._last_action = None

    def _decision(self, budget: int) -> SloDecision:
        if self.state == sbmod.SLO_STATE_OFF:
            return SloDecision(self.default_budget_ns, sbmod.SLO_STATE_OFF, 0, 0, "")
        return SloDecision(int(budget), self.state, self.target_ns, self.p99_ns, self.source)


# ---------------------------------------------------------------------------
# The busy-period proxy


class BusyTracker:
    """Turns one HP client's scoreboard fields, read at each daemon tick, into
    busy-period durations (the SLO proxy), kept as a cumulative histogram.

    The agent stores `busy_start_ns` and then bumps `busy_periods` when an HP
    launch finds nothing of its process in flight more than the idle window
    after its previous launch. A period ends, as far as the daemon can see, at
    the first tick where the client's lanes are all complete and its last
    launch is more than the idle window old: from then on its next launch
    starts a new period. So a duration is late by up to one tick (plus the
    completion write's latency): the proxy overestimates.
    """

    def __init__(self):
        self.hist = [0] * sbmod.SLO_HIST_BUCKETS
        self.samples = 0
        self.lost = 0        # periods that began and ended between two ticks' reads of a new start
        self._periods: int | None = None
        self._open_start: int | None = None

    def _record(self, duration_ns: int) -> None:
        self.hist[sbmod.slo_bucket(max(0, duration_ns))] += 1
        self.samples += 1

    def observe(self, now_ns: int, periods: int, start_ns: int, in_flight: int, last_launch_ns: int,
                idle_window_ns: int) -> int | None:
        """Feeds one tick's reading; returns the duration of a period it closed, if any."""
        closed = None
        if self._periods is None:
            self._periods = periods
            if periods and (in_flight > 0 or now_ns - last_launch_ns <= idle_window_ns):
                self._open_start = start_ns
        elif periods != self._periods:
            if self._open_start is not None:
                # ended before the new one began (nothing was in flight at its first launch)
                closed = max(0, start_ns - self._open_start)
                self._record(closed)
            self.lost += max(0, periods - self._periods - 1)
            self._periods = periods
            self._open_start = start_ns
        if self._open_start is not None and in_flight == 0 and now_ns - last_launch_ns > idle_window_ns:
            closed = now_ns - self._open_start
            self._record(closed)
            self._open_start = None
        return closed


def sample_board(board, now_ns: int, trackers: dict) -> SloSample:
    """Reads the SLO signal of every active HP client with an SLO from a
    tally.scoreboard.Scoreboard. `trackers` ({key: BusyTracker}) persists
    between calls (the daemon keeps it per board); stale keys are dropped."""
    sample = SloSample(now_ns)
    idle = board.idle_window_ns
    seen = set()
    for slot in board.slots():
        if board.slot_state(slot) != sbmod.SLOT_ACTIVE or board.slot_get(slot, "priority") != sbmod.PRIORITY_HIGH:
            continue
        pid = board.slot_get(slot, "pid")
        slo_ns = board.slot_get(slot, "slo_p99_ns")
        if pid == 0 or slo_ns == 0:
            continue
        key = (slot, pid, board.slot_get(slot, "claim_ns"))
        seen.add(key)
        tracker = trackers.get(key)
        if tracker is None:
            tracker = trackers[key] = BusyTracker()
        periods = board.slot_get(slot, "busy_periods")
        start = board.slot_get(slot, "busy_start_ns")
        if board.slot_get(slot, "busy_periods") == periods:  # not torn by a new period starting
            tracker.observe(now_ns, periods, start, int(board.busy(slot)), board.slot_get(slot, "last_launch_ns"),
                            idle)
        requests, _ = board.slo_requests(slot)
        if requests:
            sample.clients[key] = SloClient(slo_ns, board.slo_hist(slot), SOURCE_REQUESTS)
        else:
            sample.clients[key] = SloClient(slo_ns, tuple(tracker.hist), SOURCE_BUSY)
    for key in list(trackers):
        if key not in seen:
            del trackers[key]
    return sample


def apply(board, decision: SloDecision) -> None:
    """Writes a decision into the scoreboard (only fields that changed)."""
    values = {
        "turnaround_budget_ns": decision.budget_ns,
        "slo_target_ns": decision.target_ns,
        "slo_p99_ns": decision.p99_ns,
        "slo_state": decision.state,
    }
    for name, value in values.items():
        if getattr(board, name) != value:
            setattr(board, name, value)
