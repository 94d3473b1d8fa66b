"""SLO mode's budget controller (tally.daemon.slo) on a simulated clock, the
busy-period proxy, and their wiring into the daemon's tick, status and metrics."""
from __future__ import annotations

import os
import random
import time

import pytest

from tally import scoreboard as sb
from tally.daemon.daemon import Daemon, DaemonConfig
from tally.daemon.slo import (SOURCE_BUSY, SOURCE_REQUESTS, BusyTracker, SloClient, SloController, SloParams,
                              SloSample, apply, sample_board)

MS = 1_000_000
US = 1_000
TICK = 10 * MS
DEFAULT_BUDGET = 100 * US


class ServerModel:
    """A toy HP server sharing the GPU with BE work: requests arrive at `rps`;
    each takes `base_ms` plus `per_budget` x the BE budget (BE kernels queued
    ahead of it), times lognormal noise. Its latencies go into a cumulative
    histogram, as tally.slo writes them."""

    def __init__(self, slo_ms=20.0, base_ms=5.0, per_budget=4.0, rps=400, sigma=0.15, seed=1):
        self.slo_ns = int(slo_ms * MS)
        self.base_ns, self.per_budget, self.rps, self.sigma = base_ms * MS, per_budget, rps, sigma
        self.hist = [0] * sb.SLO_HIST_BUCKETS
        self.rng = random.Random(seed)
        self._carry = 0.0
        self.recent: list[float] = []

    def advance(self, budget_ns: int, dt_ns: int) -> None:
        self._carry += self.rps * dt_ns / 1e9
        while self._carry >= 1:
            self._carry -= 1
            latency = (self.base_ns + self.per_budget * budget_ns) * self.rng.lognormvariate(0, self.sigma)
            self.hist[sb.slo_bucket(int(latency))] += 1
            self.recent.append(latency)

    def true_p99(self) -> float:
        values = sorted(self.recent)
        self.recent.clear()
        return values[int(0.99 * (len(values) - 1))] if values else 0.0

    def client(self, source=SOURCE_REQUESTS) -> SloClient:
        return SloClient(self.slo_ns, tuple(self.hist), source)


def simulate(controller, servers: dict, seconds: float, start=0, trace=None):
    now = start
    decision = controller.step(SloSample(now, {k: s.client() for k, s in servers.items()}))
    for _ in range(int(seconds * 1e9 / TICK)):
        for s in servers.values():
            s.advance(decision.budget_ns, TICK)
        now += TICK
        decision = controller.step(SloSample(now, {k: s.client() for k, s in servers.items()}))
        if trace is not None:
            trace.append((now, decision))
    return now, decision


def test_no_hp_with_an_slo_leaves_the_configured_budget():
    c = SloController(DEFAULT_BUDGET)
    for t in range(0, 2_000 * MS, TICK):
        d = c.step(SloSample(t, {}))
        assert (d.budget_ns, d.state, d.target_ns) == (DEFAULT_BUDGET, sb.SLO_STATE_OFF, 0)
    # an HP client without an SLO is not controlled either
    d = c.step(SloSample(3_000 * MS, {(0, 1, 1): SloClient(0, (0,) * sb.SLO_HIST_BUCKETS)}))
    assert (d.budget_ns, d.state) == (DEFAULT_BUDGET, sb.SLO_STATE_OFF)


def test_converges_to_the_largest_budget_that_holds_the_slo():
    # p99 ~ (5 ms + 4 x budget) x e^(2.33 x 0.15) = 1.42 x (5 ms + 4 x budget): SLO 20 ms at budget ~2.27 ms
    server = ServerModel()
    c = SloController(DEFAULT_BUDGET)
    trace = []
    now, d = simulate(c, {(0, 10, 1): server}, 60, trace=trace)
    budgets = [dec.budget_ns for t, dec in trace if t > 40_000 * MS]
    assert c.increases > 10 and c.decreases >= 1
    assert 1.0 * MS < min(budgets) and max(budgets) < 2.8 * MS, (min(budgets), max(budgets))
    # the SLO holds over the settled run: measured on the true latencies, at most a few windows violate
    violations = 0
    for _ in range(20):
        simulate(c, {(0, 10, 1): server}, 1, start=now)
        now += 1_000 * MS
        violations += server.true_p99() > server.slo_ns
    assert violations <= 4
    assert d.target_ns == server.slo_ns and d.p99_ns > 0


def test_budget_stays_within_its_bounds():
    params = SloParams(min_budget_ns=20 * US, max_budget_ns=500 * US)
    # an HP that no budget can hurt: the budget climbs to the cap and stays
    c = SloController(DEFAULT_BUDGET, params)
    _, d = simulate(c, {1: ServerModel(per_budget=0.0)}, 10)
    assert d.budget_ns == 500 * US and d.state == sb.SLO_STATE_INCREASE
    # an HP that violates whatever BE does: the floor, reported as such
    c = SloController(DEFAULT_BUDGET, params)
    _, d = simulate(c, {1: ServerModel(base_ms=30)}, 5)
    assert d.budget_ns == 20 * US and d.state == sb.SLO_STATE_FLOOR


def test_a_violation_decreases_within_one_window():
    params = SloParams()
    server = ServerModel(per_budget=1.0)  # p99 ~7.2 ms + 1.4 x budget
    c = SloController(DEFAULT_BUDGET, params)
    now, d = simulate(c, {1: server}, 20)
    high = d.budget_ns
    assert high > 4 * MS
    # a load step: the same budget now costs HP five times as much
    server.per_budget = 5.0
    trace = []
    simulate(c, {1: server}, params.window_ns / 1e9, start=now, trace=trace)
    first_decrease = next(t for t, dec in trace if dec.state == sb.SLO_STATE_DECREASE)
    assert first_decrease - now <= params.window_ns
    assert trace[-1][1].budget_ns <= high * params.decrease


def test_recovers_after_the_load_goes_away():
    server = ServerModel(per_budget=1.0)
    c = SloController(DEFAULT_BUDGET)
    now, _ = simulate(c, {1: server}, 20)
    server.per_budget = 20.0
    now, low = simulate(c, {1: server}, 10, start=now)
    server.per_budget = 1.0
    _, d = simulate(c, {1: server}, 20, start=now)
    assert low.budget_ns < 1.5 * MS and d.budget_ns > low.budget_ns + 3 * MS


def test_holds_between_the_margin_and_the_slo():
    # every latency 13 ms: its bucket is [11.9, 14.1) ms, and the histogram's p99 reads near its top
    # (the histogram overestimates by up to one bucket, 19%); 0.9 x 15 ms <= 14.1 ms <= 15 ms
    server = ServerModel(per_budget=0.0, base_ms=13.0, sigma=0.0, slo_ms=15.0)
    c = SloController(DEFAULT_BUDGET)
    _, d = simulate(c, {1: server}, 3)
    assert d.state == sb.SLO_STATE_HOLD and d.budget_ns == DEFAULT_BUDGET and c.increases == c.decreases == 0


def test_too_few_latencies_is_warmup_and_changes_nothing():
    server = ServerModel(rps=2)  # ~2 requests per window since the last change, under min_samples
    c = SloController(DEFAULT_BUDGET)
    _, d = simulate(c, {1: server}, 3)
    assert d.state == sb.SLO_STATE_WARMUP and d.budget_ns == DEFAULT_BUDGET


def test_the_tightest_slo_binds_with_several_hp_clients():
    loose = ServerModel(slo_ms=100.0, seed=2)
    tight = ServerModel(slo_ms=20.0, seed=3)
    c = SloController(DEFAULT_BUDGET)
    now, d = simulate(c, {"loose": loose, "tight": tight}, 40)
    assert d.budget_ns < 2.8 * MS  # what the tight one alone allows
    assert d.target_ns == tight.slo_ns
    # alone, the loose one lets the budget grow much further
    c2 = SloController(DEFAULT_BUDGET)
    _, d2 = simulate(c2, {"loose": ServerModel(slo_ms=100.0, seed=2)}, 40)
    assert d2.budget_ns > 3 * d.budget_ns
    # the tight client leaves: control goes on with the other, budget rising
    _, d3 = simulate(c, {"loose": loose}, 10, start=now)
    assert d3.target_ns == loose.slo_ns and d3.budget_ns > d.budget_ns


def test_last_slo_client_leaving_restores_the_default():
    c = SloController(DEFAULT_BUDGET)
    now, d = simulate(c, {1: ServerModel(per_budget=0.0)}, 5)
    assert d.budget_ns > DEFAULT_BUDGET
    d = c.step(SloSample(now + TICK, {}))
    assert (d.budget_ns, d.state, d.target_ns, d.p99_ns) == (DEFAULT_BUDGET, sb.SLO_STATE_OFF, 0, 0)


def test_switching_from_the_proxy_to_reported_requests_starts_a_fresh_history():
    c = SloController(DEFAULT_BUDGET)
    busy = [0] * sb.SLO_HIST_BUCKETS
    now = 0
    for i in range(100):
        busy[sb.slo_bucket(5 * MS)] += 4
        c.step(SloSample(now, {1: SloClient(20 * MS, tuple(busy), SOURCE_BUSY)}))
        now += TICK
    assert c.source == SOURCE_BUSY
    req = [0] * sb.SLO_HIST_BUCKETS
    for i in range(100):
        req[sb.slo_bucket(50 * MS)] += 4  # far over the SLO: the requests, not the proxy, decide now
        d = c.step(SloSample(now, {1: SloClient(20 * MS, tuple(req), SOURCE_REQUESTS)}))
        now += TICK
    assert d.source == SOURCE_REQUESTS and d.state in (sb.SLO_STATE_DECREASE, sb.SLO_STATE_FLOOR)
    assert d.p99_ns > 40 * MS


# ------------------------------------------------------------ busy-period proxy

IDLE = 100 * US


def test_busy_tracker_measures_periods_to_the_tick_that_sees_them_end():
    t = BusyTracker()
    # a period starts at 1 ms, still in flight at the 10 ms tick, done by the 20 ms tick
    assert t.observe(10 * MS, 1, 1 * MS, 3, 9 * MS, IDLE) is None
    assert t.observe(20 * MS, 1, 1 * MS, 0, 12 * MS, IDLE) == 19 * MS
    # idle ticks record nothing
    assert t.observe(30 * MS, 1, 1 * MS, 0, 12 * MS, IDLE) is None
    # a period that starts and ends between two ticks: seen at the next tick
    assert t.observe(40 * MS, 2, 33 * MS, 0, 34 * MS, IDLE) == 7 * MS
    # a new period starting while the previous one looked open: that one ended before it
    assert t.observe(50 * MS, 3, 45 * MS, 2, 49 * MS, IDLE) is None
    assert t.observe(60 * MS, 4, 57 * MS, 1, 59 * MS, IDLE) == 12 * MS
    # two periods between ticks: one is lost, counted
    t.observe(70 * MS, 4, 57 * MS, 0, 65 * MS, IDLE)
    t.observe(90 * MS, 6, 85 * MS, 0, 86 * MS, IDLE)
    assert t.lost == 1 and t.samples == 5 and sum(t.hist) == 5


def test_busy_tracker_waits_for_the_idle_window_after_the_last_launch():
    t = BusyTracker()
    t.observe(10 * MS, 1, 5 * MS, 1, 9 * MS, IDLE)
    # nothing in flight but the last launch is within the idle window: the period may go on
    assert t.observe(20 * MS, 1, 5 * MS, 0, 20 * MS - 50 * US, IDLE) is None
    assert t.observe(30 * MS, 1, 5 * MS, 0, 20 * MS - 50 * US, IDLE) == 25 * MS


# ------------------------------------------------------------------ daemon wiring


def _report(board, slot, latency_ns, n=1):
    from tally.slo import Reporter

    r = Reporter.for_scoreboard(board, slot)
    for _ in range(n):
        r.report_ns(latency_ns)


def test_daemon_tick_adapts_the_budget_to_reported_latencies(tally_daemon):
    daemon, board = tally_daemon
    now = time.monotonic_ns()
    hp = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, slo_p99_ns=20 * MS)
    board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT)
    for i in range(1, 60):
        _report(board, hp, 5 * MS, 5)  # far under the SLO: the budget grows
        daemon.tick(now + i * TICK)
    assert board.turnaround_budget_ns > DEFAULT_BUDGET
    assert board.slo_state == sb.SLO_STATE_INCREASE and board.slo_target_ns == 20 * MS
    assert board.slo_p99_ns == pytest.approx(5 * MS, rel=0.2)
    grown = board.turnaround_budget_ns
    for i in range(60, 90):
        _report(board, hp, 40 * MS, 5)  # violation
        daemon.tick(now + i * TICK)
    assert board.turnaround_budget_ns < grown
    assert board.slo_state in (sb.SLO_STATE_DECREASE, sb.SLO_STATE_FLOOR, sb.SLO_STATE_WARMUP)
    # the HP client leaves: the configured budget is back and SLO mode is off
    board.release_slot(hp)
    daemon.tick(now + 91 * TICK)
    assert board.turnaround_budget_ns == DEFAULT_BUDGET and board.slo_state == sb.SLO_STATE_OFF
    assert board.slo_target_ns == 0 and not daemon.slo


def test_daemon_uses_the_busy_period_proxy_without_reports(tally_daemon):
    daemon, board = tally_daemon
    now = time.monotonic_ns()
    hp = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, slo_p99_ns=50 * MS)
    periods = 0
    for i in range(1, 100):
        t = now + i * TICK
        if i % 2:  # a busy period starting 2 ms before this tick, still in flight
            periods += 1
            board.slot_set(hp, "busy_start_ns", t - 2 * MS)
            board.slot_set(hp, "busy_periods", periods)
            board.slot_set(hp, "last_launch_ns", t - 1 * MS)
            board.set_lane_launched(hp, 0, periods)
        else:  # completed by the next tick
            board.set_lane_completed(hp, 0, periods)
        daemon.tick(t)
    controller = daemon.slo[0]
    assert controller.source == "busy" and board.slo_target_ns == 50 * MS
    assert board.slo_p99_ns == pytest.approx(12 * MS, rel=0.2)  # 2 ms + one tick: the proxy's bias
    assert board.turnaround_budget_ns > DEFAULT_BUDGET


def test_no_slo_leaves_the_budget_alone(tally_daemon):
    daemon, board = tally_daemon
    board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
    for i in range(30):
        daemon.tick(time.monotonic_ns() + i * TICK)
    assert board.turnaround_budget_ns == DEFAULT_BUDGET and not daemon.slo
    assert board.slo_state == sb.SLO_STATE_OFF


def test_policy_tgs_ignores_slos(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_SHM_DIR", str(tmp_path))
    params = {**sb.PolicyParams().__dict__, "policy": sb.POLICY_TGS}
    config = DaemonConfig(gpus=[{"index": 0, "uuid": "GPU-aaaa1111", "name": "fake"}], mps_mode="none",
                          metrics_port=0, params=params)
    (tmp_path / "run").mkdir(mode=0o700)
    daemon = Daemon(config, tmp_path / "run")
    daemon.start()
    try:
        board = daemon.boards[0]
        board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, slo_p99_ns=MS)
        for i in range(20):
            daemon.tick(time.monotonic_ns() + i * TICK)
        assert not daemon.slo and board.slo_state == sb.SLO_STATE_OFF
    finally:
        daemon.shutdown()


def test_sample_board_reads_slo_clients_only(tally_daemon):
    _, board = tally_daemon
    board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)  # no SLO
    board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, slo_p99_ns=MS)  # BE: ignored
    hp = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, slo_p99_ns=7 * MS)
    _report(board, hp, 3 * MS, 2)
    trackers = {}
    sample = sample_board(board, time.monotonic_ns(), trackers)
    (key, client), = sample.clients.items()
    assert key[0] == hp and client.slo_ns == 7 * MS and client.source == SOURCE_REQUESTS
    assert sum(client.hist) == 2 and client.hist[sb.slo_bucket(3 * MS)] == 2
    assert list(trackers) == [key]


def test_apply_writes_only_changes(tally_daemon):
    from tally.daemon.slo import SloDecision

    _, board = tally_daemon
    apply(board, SloDecision(300 * US, sb.SLO_STATE_HOLD, 20 * MS, 15 * MS, SOURCE_REQUESTS))
    assert (board.turnaround_budget_ns, board.slo_state, board.slo_target_ns, board.slo_p99_ns) == (
        300 * US, sb.SLO_STATE_HOLD, 20 * MS, 15 * MS)


def test_status_and_metrics_show_slo_mode(tally_daemon):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from tally.daemon import cli as dcli
    from tally.daemon.metrics import ScoreboardCollector

    daemon, board = tally_daemon
    hp = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, slo_p99_ns=20 * MS)
    now = time.monotonic_ns()
    for i in range(1, 40):
        _report(board, hp, 5 * MS, 5)
        daemon.tick(now + i * TICK)
    report = dcli.collect_status(daemon.state())
    gpu = report["gpus"][0]
    assert gpu["slo"]["state"] == "increase" and gpu["slo"]["target_ms"] == 20
    assert gpu["turnaround_budget_us"] > 100
    (client,) = [c for c in gpu["clients"] if c["slot"] == hp]
    assert client["slo_p99_ms"] == 20 and client["requests"] == 195
    registry = CollectorRegistry()
    registry.register(ScoreboardCollector(daemon))
    text = generate_latest(registry).decode()
    assert 'tally_slo_target_seconds{gpu="GPU-aaaa1111"} 0.02' in text
    assert 'tally_slo_state{gpu="GPU-aaaa1111",state="increase"} 1.0' in text
    assert "tally_turnaround_budget_seconds" in text and "tally_slo_p99_seconds" in text
    assert "tally_client_requests_total" in text and "tally_client_slo_p99_target_seconds" in text
