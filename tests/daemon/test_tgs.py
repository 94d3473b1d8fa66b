"""The TGS baseline's rate controller (tally.daemon.tgs) on a simulated clock,
and its wiring into the daemon's tick and the scoreboard."""
from __future__ import annotations

import os
import time

import pytest

from tally import scoreboard as sb
from tally.daemon.daemon import Daemon, DaemonConfig
from tally.daemon.tgs import CONTROL, IDLE, LEARN, TgsController, TgsParams, TgsSample, apply, sample_board

MS = 1_000_000
TICK = 10 * MS
HP = (0, 100, 1)
BE = (1, 200, 2)


class GpuModel:
    """A toy shared GPU: HP completes `hp_demand` launches/s while BE launches at most
    `capacity` per second; above that, HP slows in proportion (interference).
    BE launches min(its demand, the limit) per second."""

    def __init__(self, hp_demand=1_000.0, be_demand=8_000.0, capacity=3_000.0, be_clients=1):
        self.hp_demand, self.be_demand, self.capacity = hp_demand, be_demand, capacity
        self.hp_done = 0.0
        self.be_done = [0.0] * be_clients
        self.hp_present = True

    def advance(self, per_client_limit: int, dt_ns: int) -> None:
        dt = dt_ns / 1e9
        clients = len(self.be_done)
        be_rate = self.be_demand if per_client_limit == 0 else min(self.be_demand, per_client_limit * clients)
        hp_rate = self.hp_demand if be_rate <= self.capacity else self.hp_demand * self.capacity / be_rate
        if self.hp_present:
            self.hp_done += hp_rate * dt
        for i in range(clients):
            self.be_done[i] += be_rate / clients * dt
        self.last_hp_rate, self.last_be_rate = hp_rate, be_rate

    def sample(self, now: int) -> TgsSample:
        hp = {HP: int(self.hp_done)} if self.hp_present else {}
        be = {(1 + i, 200 + i, 2): int(v) for i, v in enumerate(self.be_done)}
        return TgsSample(now, hp, be)


def simulate(controller, gpu, seconds, start=0, trace=None):
    now = start
    decision = controller.step(gpu.sample(now))
    for _ in range(int(seconds * 1e9 / TICK)):
        gpu.advance(decision.limit_per_client, TICK)
        now += TICK
        decision = controller.step(gpu.sample(now))
        if trace is not None:
            trace.append((now, decision, gpu.last_hp_rate, gpu.last_be_rate))
    return now, decision


def test_no_hp_client_means_unlimited():
    c = TgsController()
    d = c.step(TgsSample(0, {}, {BE: 0}))
    assert (d.limit_per_client, d.phase) == (0, IDLE)
    d = c.step(TgsSample(10 * TICK, {}, {BE: 500}))
    assert d.limit_per_client == 0


def test_a_new_hp_client_starts_learning_with_be_throttled():
    p = TgsParams()
    c = TgsController(p)
    gpu = GpuModel()
    now, d = simulate(c, gpu, 0.3)
    assert d.phase == LEARN and d.limit_per_client == p.min_rate_per_s
    # settle + one window later the standalone rate is known and control begins
    now, d = simulate(c, gpu, 0.4, start=now)
    assert d.phase == CONTROL
    assert d.standalone_rate == pytest.approx(1_000, rel=0.05)


def test_aimd_keeps_hp_near_standalone_and_gives_be_the_rest():
    p = TgsParams()
    c = TgsController(p)
    gpu = GpuModel(capacity=3_000)
    trace = []
    simulate(c, gpu, 30, trace=trace)
    steady = [t for t in trace if t[0] > 15e9 and t[1].phase == CONTROL]
    assert steady
    # "near": within the controller's noise margin (3 sigma of 500 completions per window: 13.4%)
    # plus one additive step of overshoot
    assert c.margin() == pytest.approx(3 / 500 ** 0.5)
    hp_ok = sum(1 for t in steady if t[2] >= (1 - c.margin() - 0.05) * 1_000) / len(steady)
    be_mean = sum(t[3] for t in steady) / len(steady)
    assert hp_ok > 0.8  # HP at (nearly) its standalone rate most of the time
    assert 1_200 < be_mean < 3_600  # BE gets a large share of the capacity, oscillating around it
    limits = [t[1].total_limit for t in steady]
    assert max(limits) < 2 * 3_000 and min(limits) >= p.min_rate_per_s
    assert c.increases > 0 and c.decreases > 0


def test_no_interference_lets_be_run_at_its_demand():
    c = TgsController()
    gpu = GpuModel(capacity=1e9, be_demand=5_000)
    trace = []
    simulate(c, gpu, 40, trace=trace)
    assert trace[-1][3] == pytest.approx(5_000, rel=0.01)
    assert c.decreases == 0
    # the limit is capped by headroom x what BE actually used: it does not run away
    assert trace[-1][1].total_limit <= 2 * 5_000 + TgsParams().increase_per_s


def test_one_decrease_then_a_window_at_the_new_limit():
    p = TgsParams()
    c = TgsController(p)
    gpu = GpuModel(capacity=500)  # BE hurts HP above 500 launches/s
    trace = []
    simulate(c, gpu, 8, trace=trace)
    decreases = [(t, d.total_limit) for (t, d, _, _), (_, before, _, _) in zip(trace[1:], trace)
                 if d.total_limit < before.total_limit and d.phase == CONTROL and before.phase == CONTROL]
    assert decreases
    for (t1, _), (t2, _) in zip(decreases, decreases[1:]):
        assert t2 - t1 >= p.window_ns  # never two cuts within one window


def test_limit_is_split_over_be_clients():
    c = TgsController()
    gpu = GpuModel(be_clients=2, capacity=3_000)
    _, d = simulate(c, gpu, 20)
    assert d.limit_per_client == -(-d.total_limit // 2)


def test_hp_leaving_unthrottles_and_a_new_hp_relearns():
    c = TgsController()
    gpu = GpuModel()
    now, d = simulate(c, gpu, 5)
    assert d.phase == CONTROL
    gpu.hp_present = False
    now, d = simulate(c, gpu, 0.1, start=now)
    assert (d.phase, d.limit_per_client, d.standalone_rate) == (IDLE, 0, 0)
    gpu.hp_present, gpu.hp_demand = True, 400.0
    now, d = simulate(c, gpu, 0.05, start=now)
    assert d.phase == LEARN
    now, d = simulate(c, gpu, 1, start=now)
    assert d.standalone_rate == pytest.approx(400, rel=0.05)


def test_a_changed_hp_client_set_relearns():
    c = TgsController()
    now = 0
    for i in range(100):
        c.step(TgsSample(now, {HP: i * 10}, {BE: i * 50}))
        now += TICK
    assert c.phase == CONTROL and c.learns == 1
    d = c.step(TgsSample(now, {HP: 1000, (5, 555, 9): 0}, {BE: 5000}))
    assert d.phase == LEARN and c.learns == 2


def test_periodic_relearning():
    p = TgsParams(relearn_every_ns=3_000 * MS)
    c = TgsController(p)
    simulate(c, GpuModel(), 10)
    assert c.learns >= 3


def test_idle_hp_during_learning_leaves_be_unlimited():
    c = TgsController()
    now = 0
    for _ in range(100):  # an HP client that completes nothing
        d = c.step(TgsSample(now, {HP: 7}, {BE: 0}))
        now += TICK
    assert d.phase == CONTROL and d.limit_per_client == 0 and d.standalone_rate == 0
    # progress resumes: learn again
    for i in range(30):
        d = c.step(TgsSample(now, {HP: 7 + 10 * i}, {BE: 0}))
        now += TICK
    assert d.phase == LEARN


def test_counters_of_new_or_restarted_clients_do_not_count_as_progress():
    c = TgsController()
    c.step(TgsSample(0, {HP: 10}, {}))
    c.step(TgsSample(TICK, {HP: 20}, {BE: 10**9}))  # a BE client appears with a large counter
    assert c._hp_total == 10 and c._be_total == 0
    c.step(TgsSample(2 * TICK, {HP: 5}, {BE: 10**9 + 3}))  # a counter that went back is ignored
    assert c._hp_total == 10 and c._be_total == 3


def test_no_be_client_refreshes_the_standalone_rate():
    c = TgsController()
    gpu = GpuModel(hp_demand=1_000, be_clients=0)
    now, d = simulate(c, gpu, 2)
    assert d.standalone_rate == pytest.approx(1_000, rel=0.05)
    gpu.hp_demand = 2_000
    now, d = simulate(c, gpu, 3, start=now)
    assert d.standalone_rate == pytest.approx(2_000, rel=0.05)


# ---------------------------------------------------------------- the scoreboard and the daemon


def test_sample_and_apply_on_a_scoreboard(tmp_path):
    with sb.Scoreboard.create(tmp_path / "sb", "GPU-tgs", sb.PolicyParams(policy=sb.POLICY_TGS)) as board:
        hp = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
        board.set_lane_launched(hp, 0, 9)
        board.set_lane_completed(hp, 0, 7)
        board.set_lane_launched(hp, 3, 5)
        board.set_lane_completed(hp, 3, 5)
        be = board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT)
        board.slot_set(be, "launches", 40)
        board.slot_set(be, "graph_launches", 2)
        repairing = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
        board.slot_set(repairing, "state", sb.SLOT_REPAIRING)
        sample = sample_board(board, 123)
        assert list(sample.hp_completed.values()) == [12]
        assert list(sample.be_launched.values()) == [42]
        assert list(sample.hp_completed)[0][:2] == (hp, os.getpid())
        from tally.daemon.tgs import TgsDecision
        apply(board, TgsDecision(750, 1500, 99.6, 1000.2, CONTROL))
        assert (board.be_rate_limit_per_s, board.hp_rate_per_s, board.hp_standalone_rate_per_s) == (750, 100, 1000)
        assert board.be_rate_burst == sb.PolicyParams().be_rate_burst


@pytest.fixture
def tgs_daemon(start_daemon):
    return start_daemon({**sb.PolicyParams().__dict__, "policy": sb.POLICY_TGS})


def test_daemon_tick_runs_the_controller(tgs_daemon):
    daemon, board = tgs_daemon
    assert board.policy == sb.POLICY_TGS
    now = time.monotonic_ns()
    daemon.tick(now)
    assert board.be_rate_limit_per_s == 0  # no HP client: unlimited
    hp = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
    board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT)
    done = 0
    for i in range(1, 80):
        done += 10
        board.set_lane_launched(hp, 0, done)
        board.set_lane_completed(hp, 0, done)
        daemon.tick(now + i * TICK)
        if i == 5:
            assert board.be_rate_limit_per_s == TgsParams().min_rate_per_s  # learning: BE throttled
    assert board.hp_standalone_rate_per_s == pytest.approx(1_000, rel=0.05)
    assert board.be_rate_limit_per_s >= TgsParams().min_rate_per_s
    assert daemon.tgs[0].phase == CONTROL


def test_tally_policy_leaves_the_rate_fields_alone(tally_env):
    config = DaemonConfig(gpus=[{"index": 0, "uuid": "GPU-aaaa1111", "name": "fake"}], mps_mode="none",
                          metrics_port=0)
    tally_env.runtime.mkdir(mode=0o700)
    daemon = Daemon(config, tally_env.runtime)
    daemon.start()
    try:
        board = daemon.boards[0]
        board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
        for i in range(30):
            daemon.tick(time.monotonic_ns() + i * TICK)
        assert board.be_rate_limit_per_s == 0 and not daemon.tgs
    finally:
        daemon.shutdown()


def test_tally_up_accepts_policy_tgs(tally_env):
    r = tally_env.tally("up", "--no-mps", "--metrics-port", "0", "--policy", "tgs")
    assert r.returncode == 0, r.stderr
    try:
        state = tally_env.wait_for_state()
        assert state["params"]["policy"] == sb.POLICY_TGS
        with sb.Scoreboard.open(state["gpus"][0]["scoreboard"]) as board:
            assert board.policy == sb.POLICY_TGS and board.be_rate_burst == sb.PolicyParams().be_rate_burst
    finally:
        assert tally_env.tally("down").returncode == 0


class PoissonGpu(GpuModel):
    """GpuModel whose HP completions arrive at random (an open-loop server at part load)."""

    def __init__(self, seed=0, **kwargs):
        super().__init__(**kwargs)
        import random

        self.rng = random.Random(seed)

    def advance(self, per_client_limit, dt_ns):
        before = self.hp_done
        super().advance(per_client_limit, dt_ns)
        mean = self.hp_done - before
        # Poisson count with that mean (Knuth's method is fine for small means; normal beyond)
        if mean < 30:
            import math

            k, t, limit = 0, 1.0, math.exp(-mean)
            while True:
                t *= self.rng.random()
                if t <= limit:
                    break
                k += 1
        else:
            k = max(0, round(self.rng.gauss(mean, mean ** 0.5)))
        self.hp_done = before + k


def test_random_hp_completions_without_interference_do_not_throttle_be():
    """An open-loop HP at 240 completions/s whose count per window moves by sqrt(N) by chance:
    without interference BE must still reach its demand (it used to be halved by every dip)."""
    c = TgsController()
    gpu = PoissonGpu(hp_demand=240.0, be_demand=35_000.0, capacity=1e9)
    trace = []
    simulate(c, gpu, 20, trace=trace)
    late = [t for t in trace if t[0] > 10e9]
    assert sum(t[3] for t in late) / len(late) > 0.9 * 35_000
    assert c.decreases <= 2


def test_slow_start_reaches_be_demand_within_seconds_then_real_interference_cuts_it():
    c = TgsController()
    gpu = GpuModel(hp_demand=1_000.0, be_demand=35_000.0, capacity=1e9)
    trace = []
    now, _ = simulate(c, gpu, 3, trace=trace)
    assert trace[-1][3] == pytest.approx(35_000, rel=0.01)  # doubling from 20/s: about 11 intervals
    gpu.capacity = 5_000.0  # now BE above 5,000 launches/s slows HP
    trace = []
    simulate(c, gpu, 10, start=now, trace=trace)
    assert c.decreases >= 1
    assert trace[-1][2] >= (1 - c.margin() - 0.05) * 1_000
