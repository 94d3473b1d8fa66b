"""The best-effort gate's decision (agent/gate.c) on a simulated clock.

gate.c is compiled on its own and called through ctypes on a real scoreboard
file made by tally.scoreboard, so the C policy and the Python layout are
checked together. Times are passed in explicitly: no sleeping, no flakiness.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally import scoreboard as sbm

ROOT = Path(__file__).resolve().parents[2]
US = 1_000

ADMIT, ADMIT_ALONE, ADMIT_IDLE, UNGATED, DAEMON_DEAD, WAIT_HP, WAIT_BUDGET, ADMIT_RATE, WAIT_RATE = range(9)
NAMES = ["admit", "admit-alone", "admit-idle", "ungated", "daemon-dead", "wait-hp", "wait-budget", "admit-rate",
         "wait-rate"]


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path_factory.mktemp("gate") / "libgate.so"
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{ROOT / 'agent'}",
                    str(ROOT / "agent" / "gate.c"), "-o", str(lib)], check=True)
    g = ctypes.CDLL(str(lib))
    g.tally_gate_decide.restype = ctypes.c_int
    g.tally_gate_decide.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                                    ctypes.c_uint64]
    g.tally_gate_decision_name.restype = ctypes.c_char_p
    g.tally_gate_held_too_long.restype = ctypes.c_int
    g.tally_gate_hp_stall_ns.restype = ctypes.c_uint64
    g.tally_gate_hp_stall_ns.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    g.tally_gate_watch_size.restype = ctypes.c_size_t
    g.tally_gate_hold_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    g.tally_gate_hold_stall_ns.restype = ctypes.c_uint64
    g.tally_gate_hold_stall_ns.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                           ctypes.c_uint64]
    g.tally_gate_held_too_long.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
    g.tally_gate_bound_ns.restype = ctypes.c_uint64
    g.tally_gate_bound_ns.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    g.tally_gate_decide_rate.restype = ctypes.c_int
    g.tally_gate_decide_rate.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(Bucket),
                                         ctypes.POINTER(ctypes.c_uint64)]
    g.tally_gate_decide_be.restype = ctypes.c_int
    g.tally_gate_decide_be.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                                       ctypes.c_uint64,
                                       ctypes.POINTER(Bucket)]
    return g


class Bucket(ctypes.Structure):
    """struct tally_gate_bucket"""
    _fields_ = [("tat_ns", ctypes.c_uint64)]


@pytest.fixture
def board(tmp_path):
    sb = sbm.Scoreboard.create(tmp_path / "sb", "GPU-00000000-0000-0000-0000-000000000000",
                               sbm.PolicyParams(idle_window_ns=100 * US, turnaround_budget_ns=100 * US,
                                                unthrottle_after_ns=100_000 * US, daemon_timeout_ns=500_000 * US))
    yield sb
    sb.close()


class Clock:
    """Simulated CLOCK_MONOTONIC anchored at the board's heartbeat."""

    def __init__(self, sb):
        self.sb = sb
        self.t0 = sb.daemon_heartbeat_ns

    def at(self, offset_ns: int) -> int:
        return self.t0 + offset_ns


def decide(gate, sb, now, inflight=0, est=10 * US, launches=None):
    # `inflight`: estimated BE work still to run, from launches still in flight (none when 0)
    return gate.tally_gate_decide(sb._address(0), now, inflight, launches if launches is not None else int(inflight > 0),
                                  est)


def add_hp(sb, last_launch_offset_ns, clock, launched=0, completed=0):
    i = sb.claim_slot(4242, sbm.PRIORITY_HIGH)
    sb.set_lane_launched(i, 3, launched)
    sb.set_lane_completed(i, 3, completed)
    sb.hp_active = sb.hp_active + 1
    sb.hp_last_launch_ns = clock.at(last_launch_offset_ns)
    return i


def test_decision_names_match(gate):
    assert [gate.tally_gate_decision_name(i).decode() for i in range(len(NAMES))] == NAMES


def test_passthrough_policy_never_gates(gate, board):
    clock = Clock(board)
    add_hp(board, 0, clock, launched=5, completed=1)
    board.policy = sbm.POLICY_PASSTHROUGH
    assert decide(gate, board, clock.at(10 * US)) == UNGATED


def test_dead_daemon_fails_open(gate, board):
    clock = Clock(board)
    add_hp(board, 0, clock, launched=5, completed=1)
    assert decide(gate, board, clock.at(10 * US)) == WAIT_HP
    assert decide(gate, board, clock.at(501_000 * US)) == DAEMON_DEAD
    board.daemon_heartbeat_ns = 0  # the daemon stopped and said so
    assert decide(gate, board, clock.at(10 * US)) == DAEMON_DEAD


def test_no_high_priority_client_means_ungated(gate, board):
    clock = Clock(board)
    assert decide(gate, board, clock.at(10 * US), inflight=10**9, est=10**9) == UNGATED


def test_an_hp_launch_call_in_progress_holds_best_effort(gate, board):
    """Between an HP launch's API enter and exit its lane does not show the work yet; a launch
    that takes longer than the idle window (a large graph) still counts as HP busy."""
    clock = Clock(board)
    i = add_hp(board, -10_000 * US, clock)
    assert decide(gate, board, clock.at(0)) == ADMIT
    board.slot_set(i, "launching", 1)
    assert decide(gate, board, clock.at(0)) == WAIT_HP
    board.slot_set(i, "launching", 0)
    assert decide(gate, board, clock.at(50 * US)) == WAIT_HP  # idle only from when it was seen busy
    assert decide(gate, board, clock.at(100 * US)) == ADMIT


def test_hp_work_in_flight_holds_best_effort(gate, board):
    clock = Clock(board)
    i = add_hp(board, -10_000 * US, clock, launched=7, completed=6)
    assert decide(gate, board, clock.at(0)) == WAIT_HP
    board.set_lane_completed(i, 3, 7)  # the GPU wrote the completion
    assert decide(gate, board, clock.at(0)) == WAIT_HP  # the idle window runs from when HP was seen busy
    assert decide(gate, board, clock.at(100 * US)) == ADMIT


def test_hp_idleness_counts_from_the_end_of_its_work_not_its_launch(gate, board):
    """A request that is one long CUDA graph: launched 150 ms ago, completing now. It must not
    count as 150 ms idle (past unthrottle_after) the moment it completes."""
    clock = Clock(board)
    i = add_hp(board, -150_000 * US, clock, launched=1, completed=0)
    assert decide(gate, board, clock.at(0)) == WAIT_HP
    assert board.hp_last_busy_ns == clock.at(0)  # the waiting agent noted HP busy
    board.set_lane_completed(i, 3, 1)
    assert decide(gate, board, clock.at(50 * US)) == WAIT_HP  # inside the idle window after the work
    assert decide(gate, board, clock.at(200 * US), est=10 * US) == ADMIT  # throttled, not ADMIT_IDLE
    assert decide(gate, board, clock.at(200 * US), inflight=95 * US, est=10 * US) == WAIT_BUDGET
    assert decide(gate, board, clock.at(100_001 * US), inflight=95 * US, est=10 * US) == ADMIT_IDLE


def test_idle_window_after_last_hp_launch(gate, board):
    clock = Clock(board)
    add_hp(board, 0, clock)
    assert decide(gate, board, clock.at(99 * US)) == WAIT_HP
    assert decide(gate, board, clock.at(100 * US)) == ADMIT


def test_turnaround_budget(gate, board):
    clock = Clock(board)
    add_hp(board, 0, clock)
    now = clock.at(1_000 * US)
    assert decide(gate, board, now, inflight=60 * US, est=40 * US) == ADMIT
    assert decide(gate, board, now, inflight=60 * US, est=41 * US) == WAIT_BUDGET
    # A kernel longer than the whole budget runs, but only alone.
    assert decide(gate, board, now, inflight=0, est=5_000 * US) == ADMIT_ALONE
    assert decide(gate, board, now, inflight=1, est=5_000 * US) == WAIT_BUDGET


def test_long_hp_idle_unthrottles_to_the_idle_depth(gate, board):
    clock = Clock(board)
    add_hp(board, 0, clock)
    now = clock.at(100_000 * US)
    assert decide(gate, board, now, inflight=1_500 * US, est=500 * US) == ADMIT_IDLE
    assert decide(gate, board, now, inflight=1_500 * US, est=501 * US) == WAIT_BUDGET


def test_the_bound_slices_are_sized_by_follows_the_gate(gate, board):
    """Slicing sizes slices by the bound the gate applies: the budget while HP is busy or was
    recently, the idle depth once HP has been idle for unthrottle_after."""
    clock = Clock(board)
    i = add_hp(board, 0, clock, launched=2, completed=1)
    assert gate.tally_gate_bound_ns(board._address(0), clock.at(200_000 * US)) == 100 * US  # HP in flight
    board.set_lane_completed(i, 3, 2)
    board.hp_last_busy_ns = 0
    assert gate.tally_gate_bound_ns(board._address(0), clock.at(99_999 * US)) == 100 * US
    assert gate.tally_gate_bound_ns(board._address(0), clock.at(100_000 * US)) == 2_000 * US
    # the bound agrees with the decision: a 2 ms slice is admitted then, not before
    assert decide(gate, board, clock.at(100_000 * US), est=2_000 * US) == ADMIT_IDLE
    assert decide(gate, board, clock.at(99_999 * US), est=2_000 * US, launches=1) == WAIT_BUDGET


def test_only_active_high_priority_slots_count(gate, board):
    clock = Clock(board)
    add_hp(board, -10_000 * US, clock)  # an idle HP client keeps hp_active > 0
    be = board.claim_slot(77, sbm.PRIORITY_BEST_EFFORT)
    board.set_lane_launched(be, 0, 100)  # BE work in flight is not HP work
    assert decide(gate, board, clock.at(0)) == ADMIT
    dead = board.claim_slot(78, sbm.PRIORITY_HIGH)
    board.set_lane_launched(dead, 1, 9)
    board.slot_set(dead, "state", sbm.SLOT_REPAIRING)  # being repaired: not ACTIVE
    assert decide(gate, board, clock.at(0)) == ADMIT
    board.slot_set(dead, "state", sbm.SLOT_ACTIVE)
    assert decide(gate, board, clock.at(0)) == WAIT_HP


def reference(policy, alive, hp_active, hp_inflight, idle, inflight, est, p: sbm.PolicyParams):
    """The policy of gate.h, written independently."""
    if policy != sbm.POLICY_TALLY:
        return UNGATED
    if not alive:
        return DAEMON_DEAD
    if hp_active == 0:
        return UNGATED
    if hp_inflight or idle < p.idle_window_ns:
        return WAIT_HP
    unthrottled = idle >= p.unthrottle_after_ns
    budget = max(p.turnaround_budget_ns, 2_000 * US) if unthrottled else p.turnaround_budget_ns
    if inflight + est <= budget:
        return ADMIT_IDLE if unthrottled else ADMIT
    return ADMIT_ALONE if inflight == 0 else WAIT_BUDGET


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from([sbm.POLICY_PASSTHROUGH, sbm.POLICY_TALLY]),
    heartbeat_age=st.integers(0, 1_000_000 * US),
    hp_clients=st.integers(0, 3),
    inflight_lanes=st.integers(0, 2),
    idle=st.integers(0, 200_000 * US),
    inflight=st.integers(0, 3_000 * US),
    est=st.integers(0, 3_000 * US),
)
def test_matches_reference_policy(gate, tmp_path_factory, policy, heartbeat_age, hp_clients, inflight_lanes, idle,
                                  inflight, est):
    params = sbm.PolicyParams(policy=policy, idle_window_ns=100 * US, turnaround_budget_ns=100 * US,
                              unthrottle_after_ns=100_000 * US, daemon_timeout_ns=500_000 * US)
    path = tmp_path_factory.mktemp("prop") / "sb"
    with sbm.Scoreboard.create(path, "GPU-prop", params) as sb:
        now = sb.daemon_heartbeat_ns + heartbeat_age
        for k in range(hp_clients):
            i = sb.claim_slot(1000 + k, sbm.PRIORITY_HIGH)
            if k < inflight_lanes:
                sb.set_lane_launched(i, k, 3)
        sb.hp_active = hp_clients
        sb.hp_last_launch_ns = now - idle
        expected = reference(policy, heartbeat_age <= params.daemon_timeout_ns, hp_clients,
                             min(inflight_lanes, hp_clients) > 0, idle, inflight, est, params)
        assert decide(gate, sb, now, inflight, est) == expected


# ---------------------------------------------------------------- policy tgs


def rate(gate, sb, now, bucket):
    wait = ctypes.c_uint64(12345)
    d = gate.tally_gate_decide_rate(sb._address(0), now, ctypes.byref(bucket), ctypes.byref(wait))
    return d, wait.value


@pytest.fixture
def tgs_board(board):
    board.policy = sbm.POLICY_TGS
    board.be_rate_limit_per_s = 1_000  # one launch per ms
    board.be_rate_burst = 4
    board.daemon_timeout_ns = 10**15  # simulated runs of seconds; the dead-daemon test sets its own
    return board


def test_tgs_without_hp_client_or_limit_is_ungated(gate, tgs_board):
    clock, bucket = Clock(tgs_board), Bucket()
    assert rate(gate, tgs_board, clock.at(0), bucket) == (UNGATED, 0)
    add_hp(tgs_board, 0, clock, launched=5, completed=1)
    tgs_board.be_rate_limit_per_s = 0  # 0 = unlimited
    assert rate(gate, tgs_board, clock.at(0), bucket) == (UNGATED, 0)
    assert bucket.tat_ns == 0  # no token was taken


def test_tgs_dead_daemon_fails_open(gate, tgs_board):
    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock)
    tgs_board.daemon_timeout_ns = 500_000 * US
    assert rate(gate, tgs_board, clock.at(499_000 * US), bucket)[0] == ADMIT_RATE
    assert rate(gate, tgs_board, clock.at(501_000 * US), bucket)[0] == DAEMON_DEAD
    tgs_board.daemon_heartbeat_ns = 0
    assert rate(gate, tgs_board, clock.at(0), bucket)[0] == DAEMON_DEAD


def test_tgs_ignores_hp_in_flight_and_the_idle_window(gate, tgs_board):
    """TGS controls the rate only: no priority hold, no budget (that is tally's policy)."""
    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock, launched=7, completed=6)
    assert rate(gate, tgs_board, clock.at(1 * US), bucket)[0] == ADMIT_RATE


def test_tgs_burst_then_one_launch_per_interval(gate, tgs_board):
    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock)
    t = clock.at(1_000_000 * US)
    assert [rate(gate, tgs_board, t, bucket)[0] for _ in range(4)] == [ADMIT_RATE] * 4  # the burst
    d, wait = rate(gate, tgs_board, t, bucket)
    assert d == WAIT_RATE and wait == 1_000 * US  # the next token, one interval later
    assert rate(gate, tgs_board, t + wait - 1, bucket)[0] == WAIT_RATE
    assert rate(gate, tgs_board, t + wait, bucket)[0] == ADMIT_RATE
    assert rate(gate, tgs_board, t + wait, bucket)[0] == WAIT_RATE
    # a long pause refills the bucket to its depth, not beyond
    later = t + 1_000_000 * US
    assert [rate(gate, tgs_board, later, bucket)[0] for _ in range(5)] == [ADMIT_RATE] * 4 + [WAIT_RATE]


def test_tgs_burst_zero_means_one(gate, tgs_board):
    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock)
    tgs_board.be_rate_burst = 0
    t = clock.at(1_000 * US)
    assert [rate(gate, tgs_board, t, bucket)[0] for _ in range(2)] == [ADMIT_RATE, WAIT_RATE]


@pytest.mark.parametrize("limit", [50, 1_000, 7_777, 40_000])
def test_tgs_long_run_rate_is_the_limit(gate, tgs_board, limit):
    """A launcher that always has work, on a simulated clock, gets limit launches/s (+ the burst)."""
    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock)
    tgs_board.be_rate_limit_per_s = limit
    t, end, admitted = clock.at(0), clock.at(2_000_000 * US), 0
    while t < end:
        d, wait = rate(gate, tgs_board, t, bucket)
        if d == ADMIT_RATE:
            admitted += 1
        else:
            assert d == WAIT_RATE and wait > 0
            t += wait
    assert abs(admitted - (2 * limit + 4)) <= 2


def test_tgs_limit_change_applies_to_the_next_launch(gate, tgs_board):
    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock)
    tgs_board.be_rate_burst = 1
    t = clock.at(1_000 * US)
    assert rate(gate, tgs_board, t, bucket)[0] == ADMIT_RATE
    tgs_board.be_rate_limit_per_s = 10  # multiplicative decrease by the daemon
    d, wait = rate(gate, tgs_board, t + 1_000 * US, bucket)
    assert d == ADMIT_RATE  # the token was already due at the old rate
    d, wait = rate(gate, tgs_board, t + 1_000 * US, bucket)
    assert d == WAIT_RATE and wait == 100_000 * US


def test_tgs_threads_share_one_bucket(gate, tgs_board):
    """Concurrent launching threads: the CAS hands out exactly `burst` tokens at one instant."""
    import threading

    clock, bucket = Clock(tgs_board), Bucket()
    add_hp(tgs_board, 0, clock)
    tgs_board.be_rate_burst = 1_000
    t = clock.at(1_000 * US)
    results: list[int] = []
    lock = threading.Lock()

    def launcher():
        mine = [rate(gate, tgs_board, t, bucket)[0] for _ in range(400)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=launcher) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count(ADMIT_RATE) == 1_000 and results.count(WAIT_RATE) == 600


def test_decide_be_dispatches_on_the_policy(gate, board):
    clock, bucket = Clock(board), Bucket()
    add_hp(board, 0, clock, launched=5, completed=1)
    address = board._address(0)
    now = clock.at(10 * US)
    assert gate.tally_gate_decide_be(address, now, 0, 0, 10 * US, ctypes.byref(bucket)) == WAIT_HP
    board.policy = sbm.POLICY_TGS
    board.be_rate_limit_per_s, board.be_rate_burst = 100, 1
    assert gate.tally_gate_decide_be(address, now, 0, 0, 10 * US, ctypes.byref(bucket)) == ADMIT_RATE
    assert gate.tally_gate_decide_be(address, now, 0, 0, 10 * US, ctypes.byref(bucket)) == WAIT_RATE
    assert gate.tally_gate_decide(address, now, 0, 0, 10 * US) == UNGATED  # the tally gate is not tgs's
    board.policy = sbm.POLICY_PASSTHROUGH
    assert gate.tally_gate_decide_be(address, now, 0, 0, 10 * US, ctypes.byref(bucket)) == UNGATED


def reference_rate(tat, now, limit, burst):
    """GCRA written independently: (decision, new tat, wait)."""
    interval = 10**9 // limit
    tolerance = (max(burst, 1) - 1) * interval
    if now < tat - tolerance:
        return WAIT_RATE, tat, tat - tolerance - now
    return ADMIT_RATE, max(tat, now) + interval, 0


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 100_000), burst=st.integers(0, 64),
       gaps=st.lists(st.integers(0, 5_000 * US), min_size=1, max_size=40))
def test_tgs_matches_reference_bucket(gate, tmp_path_factory, limit, burst, gaps):
    path = tmp_path_factory.mktemp("tgs") / "sb"
    params = sbm.PolicyParams(policy=sbm.POLICY_TGS, daemon_timeout_ns=10**15, be_rate_burst=burst)
    with sbm.Scoreboard.create(path, "GPU-tgs", params) as sb:
        sb.claim_slot(1000, sbm.PRIORITY_HIGH)
        sb.hp_active = 1
        sb.be_rate_limit_per_s = limit
        bucket, tat, now = Bucket(), 0, sb.daemon_heartbeat_ns
        for gap in gaps:
            now += gap
            expected, tat, wait = reference_rate(tat, now, limit, burst)
            assert rate(gate, sb, now, bucket) == (expected, wait)
            assert bucket.tat_ns == tat


def test_budget_counts_remaining_work_but_a_long_kernel_waits_for_none_in_flight(gate, board):
    clock = Clock(board)
    add_hp(board, -10_000 * US, clock)  # HP idle for 10 ms: throttled, budget 100 us
    now = clock.at(0)
    # 20 us of BE work left (its launch still in flight): a 70 us kernel fits the budget
    assert decide(gate, board, now, inflight=20 * US, est=70 * US, launches=1) == ADMIT
    assert decide(gate, board, now, inflight=40 * US, est=70 * US, launches=1) == WAIT_BUDGET
    # a kernel over the budget runs alone: not while any launch is in flight, even one with no
    # estimated work left
    assert decide(gate, board, now, inflight=0, est=300 * US, launches=1) == WAIT_BUDGET
    assert decide(gate, board, now, inflight=0, est=300 * US, launches=0) == ADMIT_ALONE


def test_held_too_long_ignores_a_mark_after_now(gate):
    """The GPU-side gate's thread reads the clock, then loads the mark the launch path stored with
    its own, later reading: a mark ahead of now is no hold (it once wrapped around to centuries
    and failed BE processes open at once on an H200)."""
    max_hold = 10_000_000_000
    now = 5_000_000_000_000
    assert not gate.tally_gate_held_too_long(0, now, max_hold)  # nothing held
    assert not gate.tally_gate_held_too_long(now + 1, now, max_hold)  # marked after now was read
    assert not gate.tally_gate_held_too_long(now, now, max_hold)
    assert not gate.tally_gate_held_too_long(now - max_hold + 1, now, max_hold)
    assert gate.tally_gate_held_too_long(now - max_hold, now, max_hold)


def test_hp_stall_counts_time_without_progress_not_time_busy(gate, board):
    """A BE wait for HP gives up after TALLY_MAX_HOLD_MS of HP making no progress: a lane whose
    completions keep coming (a saturated HP client) never stalls; one whose completion count stops
    moving does, and so does a launch call that does not return."""
    watch = ctypes.create_string_buffer(gate.tally_gate_watch_size())  # zeroed
    addr = board._address(0)
    ms = 1_000_000
    assert gate.tally_gate_hp_stall_ns(watch, addr, 1_000 * ms) == 0  # no HP client
    i = board.claim_slot(4242, sbm.PRIORITY_HIGH)
    board.set_lane_launched(i, 3, 10)
    board.set_lane_completed(i, 3, 4)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 1_000 * ms) == 0  # first seen now
    for k in range(1, 20):  # busy for 19 s, but a completion lands every second
        board.set_lane_launched(i, 3, 10 + k)
        board.set_lane_completed(i, 3, 4 + k)
        assert gate.tally_gate_hp_stall_ns(watch, addr, (1_000 + 1_000 * k) * ms) == 0
    # the completions stop: the stall grows from the last one seen
    assert gate.tally_gate_hp_stall_ns(watch, addr, 21_000 * ms) == 1_000 * ms
    assert gate.tally_gate_hp_stall_ns(watch, addr, 30_000 * ms) == 10_000 * ms
    board.set_lane_completed(i, 3, 29)  # all done: nothing in flight
    assert gate.tally_gate_hp_stall_ns(watch, addr, 31_000 * ms) == 0
    # launch calls in progress at every look: new calls beginning are no progress (a call that
    # does not return, or a leaked count, must not hold BE for good); seen at 0, the stall ends
    board.slot_set(i, "launching", 1)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 40_000 * ms) == 0
    board.slot_set(i, "launches", board.slot_get(i, "launches") + 1)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 45_000 * ms) == 5_000 * ms
    board.slot_set(i, "launching", 0)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 46_000 * ms) == 0
    board.slot_set(i, "launching", 2)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 47_000 * ms) == 0
    # calls that overlap (never 0 at a look) while the slot's work keeps completing: no stall
    board.set_lane_launched(i, 3, 40)
    for k in range(1, 15):
        board.set_lane_completed(i, 3, 29 + k)
        assert gate.tally_gate_hp_stall_ns(watch, addr, (47_000 + 1_000 * k) * ms) == 0


def test_hp_stall_is_the_longest_over_lanes_and_forgets_a_slot_that_changed_hands(gate, board):
    watch = ctypes.create_string_buffer(gate.tally_gate_watch_size())
    addr, ms = board._address(0), 1_000_000
    i = board.claim_slot(4242, sbm.PRIORITY_HIGH)
    board.set_lane_launched(i, 1, 5)
    board.set_lane_launched(i, 2, 5)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 1_000 * ms) == 0
    board.set_lane_completed(i, 1, 1)  # lane 1 moves, lane 2 is stuck
    assert gate.tally_gate_hp_stall_ns(watch, addr, 4_000 * ms) == 3_000 * ms
    # the client exits with lane 2 stuck; the slot is repaired, freed and claimed by a new client
    board.repair_slot(i)
    assert gate.tally_gate_hp_stall_ns(watch, addr, 5_000 * ms) == 0
    board.release_slot(i)
    j = board.claim_slot(4343, sbm.PRIORITY_HIGH)
    assert j == i
    board.set_lane_launched(j, 2, 1)  # its first launch, in flight: no stall carried over
    assert gate.tally_gate_hp_stall_ns(watch, addr, 20_000 * ms) == 0
    assert gate.tally_gate_hp_stall_ns(watch, addr, 21_000 * ms) == 1_000 * ms


def test_hp_stall_of_an_idle_window_that_never_passes(gate, board):
    """HP busy by its idle window alone, with nothing in flight: that ends by itself unless HP's
    marks stop moving where the window never passes (a mark ahead of this clock)."""
    watch = ctypes.create_string_buffer(gate.tally_gate_watch_size())
    addr, ms = board._address(0), 1_000_000
    board.hp_last_launch_ns = 10**15
    assert gate.tally_gate_hp_stall_ns(watch, addr, 1_000 * ms) == 0
    assert gate.tally_gate_hp_stall_ns(watch, addr, 12_000 * ms) == 11_000 * ms
    board.hp_last_launch_ns = 10**15 + 1  # HP launched again
    assert gate.tally_gate_hp_stall_ns(watch, addr, 13_000 * ms) == 0


def test_hold_clock_per_kind_of_wait(gate, board):
    """What TALLY_MAX_HOLD_MS bounds, per decision: wait-hp, HP's stall; wait-budget, how long this
    process's oldest launch in flight has been running within the hold (waits for HP in between,
    and other launches of ours completing on other lanes, do not reset it: a lost completion write
    of ours must still fail us open); wait-rate, the current run of rate waits."""
    hold = ctypes.create_string_buffer(64)  # struct tally_gate_hold
    watch = ctypes.create_string_buffer(gate.tally_gate_watch_size())
    addr, ms = board._address(0), 1_000_000
    unknown = 2**64 - 1  # TALLY_GATE_OLDEST_UNKNOWN
    i = board.claim_slot(4242, sbm.PRIORITY_HIGH)
    gate.tally_gate_hold_start(hold, watch, 1_000 * ms)

    def stall(t_ms, d, oldest_ms):
        oldest = unknown if oldest_ms is None else oldest_ms * ms
        return gate.tally_gate_hold_stall_ns(hold, addr, t_ms * ms, d, oldest) // ms

    board.set_lane_launched(i, 3, 10)
    # our oldest launch started before the hold: counted from the hold's start
    assert stall(1_000, WAIT_BUDGET, 500) == 0
    for t in range(2, 13):  # HP busy and completing; our oldest launch never completes
        board.set_lane_completed(i, 3, t - 2)
        assert stall(t * 1_000 - 500, WAIT_HP, 500) == 0
        assert stall(t * 1_000, WAIT_BUDGET, 500) == (t - 1) * 1_000
    assert stall(13_000, WAIT_BUDGET, None) == 12_000  # a lane left out: the last oldest stands
    assert stall(13_500, WAIT_BUDGET, 12_900) == 600  # it completed; the next oldest began at 12.9 s
    assert stall(14_000, WAIT_BUDGET, 0) == 0  # nothing of ours in flight
    assert stall(15_000, WAIT_RATE, 0) == 0
    assert stall(16_500, WAIT_RATE, 0) == 1_500
    assert stall(17_000, WAIT_BUDGET, 0) == 0
    assert stall(17_500, WAIT_RATE, 0) == 0  # a new run of rate waits
    gate.tally_gate_hold_start(hold, None, 20_000 * ms)  # no watch: HP's busy time counts
    assert stall(25_000, WAIT_HP, 0) == 5_000
