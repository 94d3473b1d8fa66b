"""The TGS baseline's controller: adaptive rate control of best-effort launches.

TGS (Wu et al., "Transparent GPU Sharing in Container Clouds for Deep Learning
Workloads", NSDI'23) shares a GPU between a production job and opportunistic
jobs without touching either program: it intercepts the opportunistic job's
kernel launches and controls the rate at which they are sent to the GPU, so
that the production job keeps the performance it has alone. The rate is set
by a feedback loop in the spirit of TCP congestion control: while the
production job's measured throughput stays at its standalone level the
opportunistic rate grows additively; when it drops, the rate is cut
multiplicatively.

Here the production job is the high-priority (HP) client and the opportunistic
job the best-effort (BE) clients of one GPU. This module is the control loop,
as a pure class: `TgsController.step(sample)` is called by the daemon on every
tick (10 ms) with counters read from the scoreboard and returns the limit the
daemon writes into the scoreboard's `be_rate_limit_per_s`. Each BE agent then
passes its launches through a process-local token bucket at that rate
(agent/gate.c, `tally_gate_decide_rate`). Nothing here reads a clock: time
comes in with the sample, so tests run it on a simulated clock.

The loop:

* **Signal**: HP progress = kernel (and graph) launches of ACTIVE HP clients
  whose completion the GPU has written (the sum of their lanes'
  completed_seq), per second, over a sliding window (`window_ns`, 500 ms).
* **Standalone rate**: learned with BE throttled to `min_rate_per_s`
  (phase "learn": `settle_ns` for BE work already queued to drain, then one
  window), when an HP client set first appears, whenever it changes, and every
  `relearn_every_ns`; also refreshed (EWMA) while no BE client is active.
* **Control** (every `interval_ns`, 100 ms): HP rate >= (1 - margin) x
  standalone: the limit grows; below: limit x= `decrease`, then no further
  change until a whole window has been measured at the new limit (one
  decrease per "round trip", as TCP does). Growth is TCP's: *slow start*
  (the limit doubles per interval) from the floor until the first decrease,
  then by max(`increase_per_s`, `increase_fraction` x limit) per interval
  (BE launch rates span 100 to 100,000 launches/s: a fixed step is too slow
  for one or too coarse for the other); after a relearn the limit resumes at
  half its old value (TCP's ssthresh), without slow start.
* **Margin**: the HP rate is a count of completions in one window; for an
  open-loop server those arrive at random, so the count moves by about its
  square root with no interference at all. margin = max(`tolerance`,
  `noise_sigmas` / sqrt(expected completions per window)), at most 0.5: a
  drop counts as interference only when it is beyond `noise_sigmas` standard
  deviations of a Poisson count (3: about two of the difference of two such
  counts, the standalone rate being one window's count too). (Measured on an H100 on 2026-11-25 before
  these two rules: a 5% margin and +250 launches/s steps held ResNet-50
  training, which launches ~35,000 kernels/s, at 2-4% of its standalone
  throughput next to a half-loaded inference server: every random dip halved
  the limit before it could grow.)
* The limit never grows past `headroom` x the BE launch rate actually
  measured over the last interval (a limit the BE does not use is not evidence that HP tolerates it),
  nor falls below `min_rate_per_s`. No HP client: unlimited (0).
* The total limit is split evenly over the active BE clients (each has its own
  bucket).

Deviations from the paper (docs/scheduling.md, "TGS baseline"):

* TGS feeds back the production job's application throughput; we measure
  completed HP launches per second from the scoreboard (no application
  change). For a GPU-bound HP job both move together; for an open-loop
  inference server below saturation the completion rate follows the arrival
  rate, so interference shows up as latency before it shows up as throughput:
  TGS then admits more BE work than tally would. That is the baseline's nature
  (the Tally paper reports TGS's HP p99 overhead at +188.9%), not a bug here.
* TGS's standalone reference comes from the production job running with the
  opportunistic job paused; we pause BE down to `min_rate_per_s` (never to 0:
  0 means "unlimited" in the scoreboard) for short learning phases.
* TGS's rate control sits in a container-level shim of the CUDA runtime; ours
  is the agent's CUPTI callback, and the bucket counts launches (kernel or
  graph), not GPU time.
* The constants (interval, window, steps, tolerance) are ours; the paper's
  controller constants are not reproduced.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

LEARN = "learn"
CONTROL = "control"
IDLE = "idle"  # no HP client: BE unlimited


@dataclass
class TgsParams:
    interval_ns: int = 100_000_000       # the controller acts this often
    window_ns: int = 500_000_000         # rates are measured over this sliding window
    settle_ns: int = 100_000_000         # learn: let queued BE work drain before measuring
    relearn_every_ns: int = 10_000_000_000
    tolerance: float = 0.05              # HP at >= 95% of standalone counts as "holding" (at least)
    # ...or within this many Poisson standard deviations of it: about 2 sigma of a difference of two
    # counts (the standalone rate is itself one window's count), 2 x sqrt(2)
    noise_sigmas: float = 3.0
    increase_per_s: int = 250            # additive increase of the total BE limit, launches/s per interval...
    increase_fraction: float = 0.1       # ...or this fraction of the limit, whichever is larger
    decrease: float = 0.5                # multiplicative decrease
    min_rate_per_s: int = 20             # the floor, and the rate while learning (total, launches/s)
    headroom: float = 2.0                # limit <= headroom x measured BE launch rate
    standalone_ewma: float = 0.25        # weight of a new standalone measurement taken with no BE client


@dataclass
class TgsSample:
    """Counters read from one scoreboard at one tick.

    hp_completed / be_launched: {client key: monotonic counter}; a key is
    anything that names one client incarnation, e.g. (slot, pid, claim_ns).
    """

    now_ns: int
    hp_completed: dict = field(default_factory=dict)
    be_launched: dict = field(default_factory=dict)


@dataclass
class TgsDecision:
    limit_per_client: int      # what to write into be_rate_limit_per_s (0 = unlimited)
    total_limit: int           # the controller's limit over all BE clients (0 = unlimited)
    hp_rate: float             # HP completed launches/s over the last window (0 until one is measured)
    standalone_rate: float     # learned HP standalone rate (0 = not known)
    phase: str


class TgsController:
    def __init__(self, params: TgsParams | None = None):
        self.p = params or TgsParams()
        self.phase = IDLE
        self.limit = 0  # total, launches/s; 0 = unlimited
        self.standalone = 0.0
        self.hp_rate = 0.0
        self._hp_keys: frozenset = frozenset()
        self._last_hp: dict = {}
        self._last_be: dict = {}
        self._hp_total = 0  # cumulative HP completions (sum of positive per-client deltas)
        self._be_total = 0
        self._history: deque = deque()  # (now, hp_total, be_total)
        self._phase_since = 0
        self._resume_limit = 0
        self._last_action = None
        self._hold_until = 0
        self._learned_at = 0
        self._be_active = 0
        self._slow_start = False
        self.decisions = 0  # counts of actions, for tests and status
        self.increases = 0
        self.decreases = 0
        self.learns = 0

    # ------------------------------------------------------------ counters

    @staticmethod
    def _advance(counters: dict, last: dict) -> int:
        """Sum of counter growth since the last sample; a client seen for the first time contributes nothing."""
        grown = 0
        for key, value in counters.items():
            before = last.get(key)
            if before is not None and value > before:
                grown += value - before
        last.clear()
        last.update(counters)
        return grown

    def _rates(self, now: int, span_ns: int) -> tuple[float, float, int] | None:
        """(HP rate, BE rate, covered ns) over the newest `span_ns` of history; None without two points."""
        if len(self._history) < 2:
            return None
        end_t, end_hp, end_be = self._history[-1]
        start = None
        for t, hp, be in reversed(self._history):
            start = (t, hp, be)
            if end_t - t >= span_ns:
                break
        t0, hp0, be0 = start
        covered = end_t - t0
        if covered <= 0:
            return None
        return (end_hp - hp0) * 1e9 / covered, (end_be - be0) * 1e9 / covered, covered

    # ------------------------------------------------------------ the loop

    def step(self, sample: TgsSample) -> TgsDecision:
        now = sample.now_ns
        p = self.p
        self._hp_total += self._advance(sample.hp_completed, self._last_hp)
        self._be_total += self._advance(sample.be_launched, self._last_be)
        self._history.append((now, self._hp_total, self._be_total))
        while len(self._history) > 2 and now - self._history[1][0] >= p.window_ns + p.interval_ns:
            self._history.popleft()
        self._be_active = len(sample.be_launched)

        hp_keys = frozenset(sample.hp_completed)
        if not hp_keys:
            if self.phase != IDLE:
                self._reset(now)
            return self._decision()
        if hp_keys != self._hp_keys:
            # a new HP job (or one left): its standalone rate is not the old one's
            self._hp_keys = hp_keys
            self.standalone = 0.0
            self._start_learning(now)
            return self._decision()

        if self._last_action is not None and now - self._last_action < p.interval_ns:
            return self._decision()
        self._last_action = now
        self.decisions += 1

        if self.phase == LEARN:
            self._learn_step(now)
        elif self.phase == CONTROL:
            self._control_step(now)
        return self._decision()

    def _reset(self, now: int) -> None:
        self.phase = IDLE
        self.limit = 0
        self.standalone = 0.0
        self.hp_rate = 0.0
        self._hp_keys = frozenset()
        self._phase_since = now

    def _start_learning(self, now: int) -> None:
        self.phase = LEARN
        self._phase_since = now
        self._resume_limit = self.limit
        self.limit = self.p.min_rate_per_s
        self.learns += 1

    def _learn_step(self, now: int) -> None:
        p = self.p
        measured_for = now - self._phase_since - p.settle_ns
        if measured_for < p.window_ns:
            return
        rates = self._rates(now, p.window_ns)
        hp_rate = rates[0] if rates else 0.0
        self.hp_rate = hp_rate
        self._learned_at = now
        self.phase = CONTROL
        if hp_rate <= 0:
            # HP made no progress alone: nothing to protect right now; BE runs unlimited until HP
            # progresses, which starts a new learning phase
            self.standalone = 0.0
            self.limit = 0
            return
        self.standalone = hp_rate
        # resume probing from half the limit held before learning (TCP's ssthresh), or slow-start
        # from the floor the first time
        resume = self._resume_limit // 2 if self._resume_limit else 0
        self._slow_start = resume == 0
        self.limit = max(p.min_rate_per_s, resume)
        self._hold_until = now + p.window_ns  # measure a window at this limit before judging it

    def _control_step(self, now: int) -> None:
        p = self.p
        rates = self._rates(now, p.window_ns)
        if rates is None:
            return
        hp_rate, _, _ = rates
        self.hp_rate = hp_rate
        # what BE uses *now* caps the next limit; over a whole window it would lag a growing limit
        recent = self._rates(now, p.interval_ns)
        be_rate = recent[1] if recent else 0.0
        if self.standalone <= 0:
            if hp_rate > 0:
                self._start_learning(now)
            return
        if now - self._learned_at >= p.relearn_every_ns:
            self._start_learning(now)
            return
        if self._be_active == 0:
            # nothing to control; HP runs alone, which is its standalone rate
            self.standalone += p.standalone_ewma * (hp_rate - self.standalone)
            return
        if now < self._hold_until:
            return
        if hp_rate >= (1.0 - self.margin()) * self.standalone:
            cap = max(int(p.headroom * be_rate), p.min_rate_per_s + p.increase_per_s)
            step = max(p.increase_per_s, int(p.increase_fraction * self.limit))
            grown = self.limit * 2 if self._slow_start else self.limit + step
            self.limit = max(p.min_rate_per_s, min(grown, max(cap, self.limit)))
            self.increases += 1
        else:
            self.limit = max(p.min_rate_per_s, int(self.limit * p.decrease))
            self._slow_start = False
            self._hold_until = now + p.window_ns
            self.decreases += 1

    def margin(self) -> float:
        """How far below standalone the HP rate may read before it counts as interference."""
        p = self.p
        expected = self.standalone * p.window_ns / 1e9
        noise = p.noise_sigmas / expected ** 0.5 if expected > 0 else 1.0
        return min(0.5, max(p.tolerance, noise))

    def _decision(self) -> TgsDecision:
        if self.limit <= 0:
            per_client = 0
        else:
            clients = max(1, self._be_active)
            per_client = max(1, -(-self.limit // clients))
        return TgsDecision(per_client, self.limit, self.hp_rate, self.standalone, self.phase)


def sample_board(board, now_ns: int) -> TgsSample:
    """Reads the counters the controller needs from a tally.scoreboard.Scoreboard."""
    from tally import scoreboard as sbmod

    sample = TgsSample(now_ns)
    for slot in board.slots():
        if board.slot_state(slot) != sbmod.SLOT_ACTIVE:
            continue
        pid = board.slot_get(slot, "pid")
        if pid == 0:
            continue
        key = (slot, pid, board.slot_get(slot, "claim_ns"))
        if board.slot_get(slot, "priority") == sbmod.PRIORITY_HIGH:
            sample.hp_completed[key] = sum(board.lane(slot, j)[1] for j in range(sbmod.MAX_LANES))
        else:
            sample.be_launched[key] = board.slot_get(slot, "launches") + board.slot_get(slot, "graph_launches")
    return sample


def apply(board, decision: TgsDecision) -> None:
    """Writes a decision into the scoreboard (only fields that changed)."""
    values = {
        "be_rate_limit_per_s": decision.limit_per_client,
        "hp_rate_per_s": int(round(decision.hp_rate)),
        "hp_standalone_rate_per_s": int(round(decision.standalone_rate)),
    }
    for name, value in values.items():
        if getattr(board, name) != value:
            setattr(board, name, value)
