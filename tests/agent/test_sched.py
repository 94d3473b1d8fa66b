"""CPU tests of the agent's scheduling path (agent/sched.c) through the doubles.

Real processes, a real scoreboard file: the test plays the tally daemon (the
`daemon` fixture creates the scoreboard and keeps its heartbeat fresh) and,
where needed, a high-priority client of its own (a slot it claims and whose
lanes it sets). The fake application runs with the agent injected; its fake
libcuda has a fake GPU that runs each stream's kernels and memory writes in
order, later, on a thread of its own, so completions really arrive
asynchronously (see tests/agent/doubles/fake_cuda.c).

Timing: nothing here asserts that something happened within a time. Orderings
that the code guarantees are asserted (a held launch returns after the test
released it; an idle window ends before a launch is admitted); timeouts only
keep a broken agent from hanging the suite.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tally import scoreboard as sbmod
from tally.scoreboard import MAX_CLIENTS, MAX_LANES, PolicyParams, Scoreboard

WARNING = re.compile(r"^tally: warning: .+")
MS = 1_000_000


def wait_until(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


def slot_of(daemon, pid: int, timeout: float = 20) -> int:
    """The slot the agent in process pid claimed (waits for the claim)."""
    slots = wait_until(lambda: daemon.slots_of(pid), timeout, f"pid {pid} to claim a slot")
    assert len(slots) == 1, slots
    return slots[0]


def lanes(sb: Scoreboard, slot: int) -> list[tuple[int, int]]:
    return [sb.lane(slot, j) for j in range(MAX_LANES)]


def hp_client_in_flight(sb: Scoreboard, lane: int = 3) -> int:
    """Claims a high-priority slot for this test process with work in flight on one lane."""
    slot = sb.claim_slot(os.getpid(), sbmod.PRIORITY_HIGH, comm="test-hp")
    sb.set_lane_launched(slot, lane, 7)
    sb.set_lane_completed(slot, lane, 6)
    sb.hp_active = 1
    return slot


def keep_hp_busy_completing(sb: Scoreboard, hp: int, seconds: float, lane: int = 3) -> int:
    """The HP client of hp_client_in_flight stays busy for `seconds`, one launch always in flight and
    a completion every 20 ms (a saturated client making progress); returns the last sequence
    number launched, still in flight."""
    end = time.monotonic() + seconds
    k = sb.lane(hp, lane)[0]
    while time.monotonic() < end:
        k += 1
        sb.set_lane_launched(hp, lane, k)
        sb.set_lane_completed(hp, lane, k - 1)
        time.sleep(0.02)
    return k


def throttle_be(sb: Scoreboard, budget_ns: int) -> None:
    """An HP client seen just now and no idle window: BE is admitted within `budget_ns`, throttled."""
    sb.set_params(PolicyParams(idle_window_ns=0, turnaround_budget_ns=budget_ns,
                               unthrottle_after_ns=1000 * 10**9, daemon_timeout_ns=60 * 10**9))
    sb.hp_active = 1
    sb.hp_last_launch_ns = time.monotonic_ns()


def one_warning(r, *fragments: str) -> str:
    lines = r.stderr_lines
    assert len(lines) == 1 and WARNING.match(lines[0]), f"stderr was {lines!r}"
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def completed_ok(r) -> None:
    assert r.returncode == 0, r.stderr
    assert "fake_app: done" in r.stdout
    assert r.gpu("gpu_bad_writes") == 0
    assert r.gpu("gpu_regressions") == 0


def inspect_while_alive(daemon, spawn_app, tmp_path, steps, priority, env=None, timeout=30):
    """Runs the app up to a final wait_file step; returns (its slot's client dict
    and lanes as seen then, the finished AppRun)."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    app = spawn_app(*steps, f"wait_file:{go}", env=daemon.env(priority, **(env or {})))
    app.wait_for("waiting", timeout=timeout)
    slot = slot_of(daemon, app.pid)
    seen = daemon.sb.client(slot), lanes(daemon.sb, slot)
    go.touch()
    return seen, app.finish(timeout=timeout)


# ------------------------------------------------------------ high priority

def test_hp_joins_tracks_completions_and_releases(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    long_us = 300_000
    app = spawn_app("launch:kernel:3:1000:s0", "launch:kernel:2:1000:s1", f"launch:kernel:1:{long_us}:s0",
                    f"wait_file:{go1}", "sync", f"wait_file:{go2}", env=daemon.env("high"))
    app.wait_for("waiting")
    seen_at = time.monotonic_ns()
    slot = slot_of(daemon, app.pid)
    c = sb.client(slot)
    assert c["state"] == sbmod.SLOT_ACTIVE and c["priority"] == sbmod.PRIORITY_HIGH
    assert c["pid"] == app.pid and c["comm"] == "fake_app"
    assert c["launches"] == 6 and c["graph_launches"] == 0 and c["failopen"] == 0
    assert c["pid_start_ticks"] > 0 and c["claim_ns"] > 0
    launched = [launched for launched, _ in lanes(sb, slot)]
    assert launched[:2] == [4, 2] and set(launched[2:]) == {0}  # one lane per stream, in order of use
    # The long kernel cannot have finished yet if we looked within its duration.
    long_call = int(re.search(r"launch i=5 call_ns=(\d+)", app.output).group(1))
    if seen_at < long_call + long_us * 1000:
        assert sb.lane(slot, 0)[1] < 4
    hp_last = sb.hp_last_launch_ns
    assert long_call <= hp_last <= seen_at
    assert sb.client(slot)["last_launch_ns"] == hp_last
    go1.touch()
    app.wait_for("waiting")
    # After cuCtxSynchronize every completion was written by the (fake) GPU, in order.
    assert lanes(sb, slot)[:2] == [(4, 4), (2, 2)]
    assert sb.in_flight(slot) == 0
    go2.touch()
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_writes_issued") == r.gpu("gpu_writes_done") == 6
    assert r.gpu("writes_s0") == 4 and r.gpu("writes_s1") == 2
    assert r.gpu("gpu_host_registers") == 1
    # Released at exit into the daemon's quarantine (late GPU writes land harmlessly).
    assert sb.slot_state(slot) == sbmod.SLOT_REPAIRING and sb.slot_get(slot, "pid") == 0
    assert all(launched == completed for launched, completed in lanes(sb, slot))


def test_hp_completion_arrives_after_the_kernels_ran(daemon, spawn_app):
    sb = daemon.sb
    app = spawn_app("launch:kernel:4:25000:s0", "sync", env=daemon.env("high"))
    slot = slot_of(daemon, app.pid)
    seen = wait_until(lambda: sb.lane(slot, 0)[1] == 4 and time.monotonic_ns(), what="completed_seq 4")
    r = app.finish()
    completed_ok(r)
    first_call = r.launches[0][0]
    assert seen >= first_call + 4 * 25 * MS  # four 25 ms kernels, one after another
    assert r.gpu("gpu_max_inflight") >= 2  # HP launches are never held back


def test_reused_slot_starts_with_fresh_counters(daemon, spawn_app, run_app, tmp_path):
    r = run_app("launch:kernel:7:0:s0", env=daemon.env("high"))
    completed_ok(r)
    assert daemon.sb.slot_state(0) == sbmod.SLOT_REPAIRING  # quarantined at exit
    daemon.sb.release_slot(0)  # what the daemon does once the quarantine is over
    (c, lane_state), r2 = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:3:0:s0", "sync"], "high")
    completed_ok(r2)
    assert c["slot"] == 0  # the first app's slot, released after its quarantine
    assert c["launches"] == 3
    # The daemon zeroed the slot when it released it: numbering starts afresh.
    assert lane_state[0] == (3, 3)


# ------------------------------------------------------------ best effort

def test_be_held_until_hp_work_completes(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:1000:s0", "launch:kernel:3:1000:s0", f"wait_file:{go}",
                    env=daemon.env("best-effort"))
    slot = slot_of(daemon, app.pid)
    wait_until(lambda: sb.slot_get(slot, "launches") >= 1, what="the BE launch to reach the gate")
    observed = time.monotonic_ns()
    time.sleep(0.05)
    assert not app.printed("launch i=0"), "the BE launch returned while HP work was in flight"
    assert sb.slot_get(slot, "launches") == 1
    released = time.monotonic_ns()
    sb.set_lane_completed(hp, 3, 7)
    app.wait_for("waiting")
    c = sb.client(slot)
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert len(r.launches) == 4
    assert all(ret > released for _, ret in r.launches)
    assert c["held_launches"] >= 1
    # held from before `observed` (the gate's clock starts before the launch is counted)
    assert c["held_ns"] >= released - observed
    assert c["launches"] == 4
    # Tracked while an HP client exists: every BE launch got its completion write.
    assert r.gpu("writes_s0") == 4


def test_run_ahead_queues_held_launches_on_the_gpu_instead_of_holding_the_thread(daemon, spawn_app, tmp_path):
    """TALLY_RUN_AHEAD=1: while HP work is in flight, BE launches return at once, each behind a
    stream wait on the GPU; the kernels run only once the agent's releaser admits them, after
    HP's work completed, and the program's sync then finds them done."""
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:4:1000:s0", f"wait_file:{go}", "sync",
                    env=daemon.env("best-effort", TALLY_RUN_AHEAD="1"))
    app.wait_for("waiting")  # all four launches returned although HP is busy
    slot = slot_of(daemon, app.pid)
    c = sb.client(slot)
    assert c["launches"] == 4 and c["held_launches"] == 4
    assert lanes(sb, slot)[0][0] == 4  # tracked as launched, with their completion writes queued too
    time.sleep(0.05)  # 1 ms kernels: had any been released, its completion would have landed
    assert lanes(sb, slot)[0][1] == 0, "a queued BE kernel ran while HP work was in flight"
    released = time.monotonic_ns()
    sb.set_lane_completed(hp, 3, 7)
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 4
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") >= 1
    assert all(ret < released for _, ret in r.launches)


@pytest.mark.parametrize("budget_ms", [1, 100])
def test_run_ahead_keeps_the_released_work_within_the_budget(daemon, run_app, budget_ms):
    """600 us kernels on four streams in turn, all queued at once: the releaser admits them in
    issue order while the work still to run fits the budget. With 1 ms, a kernel is admitted
    only once those running have 400 us left between them, so at most three run together;
    with 100 ms all four streams run at once."""
    throttle_be(daemon.sb, budget_ms * MS)
    env = daemon.env("best-effort", TALLY_RUN_AHEAD="1", TALLY_KERNEL_TIMES="1")
    # teach the estimate first (an unknown kernel counts as the whole budget), from the fake
    # GPU's kernel times: poll timing would depend on how busy this machine is
    steps = ["launch:kernel:3:600:s0", "sync"] + [f"launch:kernel:1:600:s{i % 4}" for i in range(24)] + ["sync"]
    r = run_app(*steps, env=env, timeout=60)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 27
    if budget_ms == 1:
        assert r.gpu("gpu_waits_issued") >= 1
        assert r.gpu("gpu_max_running") <= 3
    else:
        assert r.gpu("gpu_max_running") == 4


@pytest.mark.parametrize("stream", ["ptds", "null", "s2"])
def test_run_ahead_queues_on_any_stream_and_with_batched_writes(daemon, run_app, stream):
    """Queued launches on the per-thread default stream, the legacy stream and a created one,
    graph launches among them, and completion writes batched: short kernels leave groups
    unwritten and a long one must run alone, so the releaser has to write those groups to
    admit it. Everything runs, nothing is held until the agent gives up."""
    throttle_be(daemon.sb, 4 * MS)
    env = daemon.env("best-effort", TALLY_RUN_AHEAD="1", TALLY_BATCH_WRITES="1", TALLY_MAX_HOLD_MS="5000")
    r = run_app(f"launch:kernel:3:200:{stream}", "sync", f"launch:kernel:20:200:{stream}",
                f"launch:graph:2:300:{stream}", f"launch:ex:2:20000:{stream}", "sync", env=env, timeout=60)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") >= 1


@pytest.mark.parametrize("stream", ["s0", "null"])
def test_run_ahead_with_threads_sharing_a_stream(daemon, run_app, stream):
    """Four threads launch on one stream at once, some let through in place and some queued,
    batched writes on: a wait must never land in front of a launch already let through (it
    would wait for a release that waits for it). Everything runs without the agent giving up."""
    throttle_be(daemon.sb, 2 * MS)
    env = daemon.env("best-effort", TALLY_RUN_AHEAD="1", TALLY_BATCH_WRITES="1", TALLY_MAX_HOLD_MS="5000")
    r = run_app(f"launch:kernel:3:300:{stream}", "sync", f"tlaunch:4:kernel:25:300:{stream}",
                f"tlaunch:4:ex:2:3000:{stream}", "sync", env=env, timeout=90)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 3 + 100 + 8


def test_run_ahead_child_of_fork_exits(daemon, run_app):
    """A fork while launches are queued and the releaser works: the child (no releaser, no
    usable context) has run-ahead off and exits normally; the parent finishes its work."""
    throttle_be(daemon.sb, 1 * MS)
    env = daemon.env("best-effort", TALLY_RUN_AHEAD="1")
    r = run_app("launch:kernel:3:500:s0", "sync", "launch:kernel:20:500:s0", "fork:2:0", "sync", env=env, timeout=60)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 23


def test_run_ahead_fails_open_and_releases_everything(daemon, spawn_app, tmp_path):
    """HP work that never completes: the releaser gives up after TALLY_MAX_HOLD_MS, with the one
    fail-open warning, and releases what it queued, so the program's sync returns."""
    sb = daemon.sb
    hp_client_in_flight(sb)
    app = spawn_app("launch:kernel:3:500:s0", "sync",
                    env=daemon.env("best-effort", TALLY_RUN_AHEAD="1", TALLY_MAX_HOLD_MS="300"))
    r = app.finish()
    completed_ok(r)
    one_warning(r, "was held for 300 ms")
    assert r.gpu("gpu_kernels") == 3
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") >= 1


GATE_OPEN = sbmod.GPU_GATE_OPEN
GATE_DISABLED = sbmod.GPU_GATE_DISABLED


def test_gpu_gate_holds_be_kernels_on_the_gpu_while_hp_is_busy(daemon, spawn_app, tmp_path):
    """TALLY_GPU_GATE=1: BE launches return at once and are neither held nor tracked, each behind a
    wait for its slot's gate word to be open; the word stays closed while HP work is in flight,
    the agent's thread opens it once HP is idle, and only then does the program's sync return."""
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:4:1000:s0", f"wait_file:{go}", "sync", "launch:kernel:1:0:s1",
                    env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    app.wait_for("waiting")  # all four launches returned although HP is busy
    slot = slot_of(daemon, app.pid)
    c = sb.client(slot)
    assert c["launches"] == 4 and c["held_launches"] == 0
    assert lanes(sb, slot)[0] == (0, 0)  # not tracked: the GPU holds them, not the gate
    assert sb.gpu_gate_slots == 1 << slot
    go.touch()
    time.sleep(0.05)  # the sync waits; a kernel that passed its wait would need the word open
    assert not sb.slot_get(slot, "gpu_gate") & GATE_OPEN, "the agent opened its gate while HP was busy"
    released = time.monotonic_ns()
    sb.set_lane_completed(hp, 3, 7)
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 5
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 5
    assert r.stats()["gpu_gate_waits"] == 5
    assert all(ret < released for _, ret in r.launches[:4])
    assert r.launches[4][0] > released  # the sync returned only after HP had completed
    assert sb.gpu_gate_slots == 0  # left at exit
    # what the word held counts as held at the gate (tally status, the metrics): the four launches
    # enqueued while it was closed, for at least the 50 ms HP stayed busy after they were
    assert sb.slot_get(slot, "held_launches") == 4
    assert sb.slot_get(slot, "held_ns") >= 50 * MS


def test_gpu_gate_is_closed_by_real_hp_launches(daemon, spawn_app, tmp_path):
    """Two agents: the HP program's launch closes the BE program's gate word before the HP kernel
    is enqueued, and the BE kernels launched then run only after the HP kernel completed."""
    sb = daemon.sb
    sb.idle_window_ns = 0
    hp_go, be_go = tmp_path / "hp_go", tmp_path / "be_go"
    hp = spawn_app("launch:kernel:1:100:s0", "sync", f"wait_file:{hp_go}", "launch:kernel:1:300000:s0", "sync",
                   env=daemon.env("high"))
    hp.wait_for("waiting")
    sb.hp_active = 1  # what the daemon's tick would count
    be = spawn_app("launch:kernel:1:100:s0", "sync", f"wait_file:{be_go}", "launch:kernel:3:1000:s0", "sync",
                   "launch:kernel:1:0:s1", env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    be.wait_for("waiting")  # the first kernel ran: the word was opened with HP idle
    be_slot = slot_of(daemon, be.pid)
    assert sb.slot_get(be_slot, "gpu_gate") & GATE_OPEN
    hp_go.touch()
    hp_call = int(re.search(r"launch i=1 call_ns=(\d+)", hp.wait_for("launch i=1")).group(1))
    word = sb.slot_get(be_slot, "gpu_gate")
    assert not word & GATE_OPEN and word >= hp_call  # closed with the HP launch's time
    be_go.touch()
    r_be = be.finish()
    completed_ok(r_be)
    r_hp = hp.finish()
    completed_ok(r_hp)
    assert r_be.stderr == "" and r_hp.stderr == ""
    assert r_be.launches[-1][0] > hp_call + 300 * MS  # BE's sync returned after the 300 ms HP kernel
    assert r_be.gpu("gpu_waits_issued") == r_be.gpu("gpu_waits_done") == 5


def test_a_new_owner_clears_a_stale_gpu_gate_bit(daemon, spawn_app, tmp_path):
    """A killed process of the GPU-side gate leaves its bit in gpu_gate_slots; whoever claims the
    slot next clears it (HP launches would otherwise keep closing a word nobody waits on)."""
    sb = daemon.sb
    sb.gpu_gate_slots = (1 << 64) - 1
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:0:s0", f"wait_file:{go}", env=daemon.env("best-effort"))
    app.wait_for("waiting")
    slot = slot_of(daemon, app.pid)
    assert sb.gpu_gate_slots == ((1 << 64) - 1) & ~(1 << slot)
    go.touch()
    completed_ok(app.finish())


def test_gpu_gate_adds_no_wait_without_an_hp_client(daemon, run_app):
    r = run_app("launch:kernel:6:100:s0", "launch:graph:2:100:null", "sync",
                env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    completed_ok(r)
    assert r.gpu("gpu_waits_issued") == 0 and r.stats()["gpu_gate_waits"] == 0


@pytest.mark.parametrize("stream", ["ptds", "null", "s2"])
def test_gpu_gate_waits_on_any_stream_and_before_graphs(daemon, spawn_app, tmp_path, stream):
    """Kernels and graphs on the per-thread default stream, the legacy stream and a created one,
    and four threads sharing the stream: each launch has its wait, and all of them pass once HP
    is idle."""
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    go = tmp_path / "go"
    app = spawn_app(f"launch:kernel:3:200:{stream}", f"launch:graph:2:300:{stream}",
                    f"tlaunch:4:kernel:5:100:{stream}", f"wait_file:{go}", "sync",
                    env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    app.wait_for("waiting")
    sb.set_lane_completed(hp, 3, 7)
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 3 + 2 + 20


def test_gpu_gate_fails_open_alone_when_hp_never_completes(daemon, spawn_app):
    """HP work that never completes: after its TALLY_MAX_HOLD_MS a process fails open with the one
    warning and its own kernels run; another BE process with a longer hold stays held until HP
    completes, and gets no warning."""
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    patient = spawn_app("launch:kernel:2:500:s0", "sync", "launch:kernel:1:0:s1",
                        env=daemon.env("best-effort", TALLY_GPU_GATE="1", TALLY_MAX_HOLD_MS="60000"))
    quick = spawn_app("launch:kernel:3:500:s0", "sync", "launch:kernel:2:500:s0", "sync",
                      env=daemon.env("best-effort", TALLY_GPU_GATE="1", TALLY_MAX_HOLD_MS="300"))
    r = quick.finish()
    completed_ok(r)
    one_warning(r, "held for 300 ms", "best-effort launches are not scheduled")
    assert r.gpu("gpu_kernels") == 5
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 3  # none after failing open
    time.sleep(0.1)
    assert not patient.printed("launch i=2"), "the other BE process was released too"
    released = time.monotonic_ns()
    sb.set_lane_completed(hp, 3, 7)
    r = patient.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.launches[2][0] > released


def test_gpu_gate_does_not_fail_open_a_process_with_nothing_held(daemon, spawn_app, tmp_path):
    """HP busy for longer than TALLY_MAX_HOLD_MS while the BE process launches nothing (its last
    wait long passed): nothing of it is held, so it is not failed open; its next launches wait
    for HP as usual."""
    sb = daemon.sb
    throttle_be(sb, 1 * MS)  # an HP client, idle: the word opens
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:100:s0", "sync", f"wait_file:{go}", "launch:kernel:2:100:s0", "sync",
                    env=daemon.env("best-effort", TALLY_GPU_GATE="1", TALLY_MAX_HOLD_MS="300"))
    app.wait_for("waiting")
    slot = slot_of(daemon, app.pid)
    time.sleep(0.15)  # the last wait is older than what may still be queued
    hp = hp_client_in_flight(sb)
    sb.slot_set(slot, "gpu_gate", time.monotonic_ns())  # what an HP launch does
    time.sleep(0.6)  # twice the max hold
    assert sb.slot_get(slot, "failopen") == 0
    assert not sb.slot_get(slot, "gpu_gate") & GATE_OPEN
    sb.set_lane_completed(hp, 3, 7)
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 3


def test_gpu_gate_exit_while_hp_is_busy_leaves_nothing_waiting(daemon, run_app):
    """A program that exits with kernels still waiting behind a closed gate (HP busy, no sync):
    its exit opens its word for good, so CUDA's teardown finds nothing waiting; no warning."""
    sb = daemon.sb
    hp_client_in_flight(sb)
    r = run_app("launch:kernel:2:100:s0", "exit:0", env=daemon.env("best-effort", TALLY_GPU_GATE="1",
                                                                    TALLY_MAX_HOLD_MS="600000"), timeout=30)
    assert r.returncode == 0 and r.stderr == ""
    assert r.gpu("gpu_waits_issued") == 2
    slot = next(i for i in range(MAX_CLIENTS) if sb.slot_get(i, "gpu_gate") == GATE_DISABLED)
    assert sb.slot_state(slot) == sbmod.SLOT_REPAIRING and sb.gpu_gate_slots == 0


def test_gpu_gate_counts_no_hold_for_work_that_finished_or_a_first_look(daemon, spawn_app, tmp_path):
    """Held time is counted from a wait enqueued behind the closed word: not for the word's own
    close before the agent's thread first looked (HP idle), and not for an HP busy period that
    began after this process's kernels had finished."""
    sb = daemon.sb
    throttle_be(sb, 1 * MS)  # an HP client, idle
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:1:s0", "sync", f"wait_file:{go}", "sync",
                    env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    app.wait_for("waiting")
    slot = slot_of(daemon, app.pid)
    hp = hp_client_in_flight(sb)
    sb.slot_set(slot, "gpu_gate", time.monotonic_ns())  # what an HP launch does
    time.sleep(0.15)
    sb.set_lane_completed(hp, 3, 7)
    time.sleep(0.05)  # the thread reopens the word
    assert sb.slot_get(slot, "gpu_gate") & GATE_OPEN
    go.touch()
    completed_ok(app.finish())
    assert sb.slot_get(slot, "held_launches") == 0 and sb.slot_get(slot, "held_ns") == 0


def test_gpu_gate_and_launch_level_holds_of_one_span_count_once(daemon, spawn_app, tmp_path):
    """A kernel waits behind the closed word while a later launch of the same process is held at
    launch (here: SLO mode began in between, so it takes the launch-level gate): the span is
    counted once, by the launch-level gate, not twice."""
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:100:s0", f"wait_file:{go}", "launch:kernel:1:100:s0", "sync",
                    env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    app.wait_for("waiting")  # the first launch returned, behind the closed word
    slot = slot_of(daemon, app.pid)
    sb.slo_state = sbmod.SLO_STATE_WARMUP
    go.touch()
    time.sleep(0.2)  # the second launch is held at launch meanwhile
    sb.set_lane_completed(hp, 3, 7)
    r = app.finish()
    completed_ok(r)
    held = sb.slot_get(slot, "held_ns")
    assert 150 * MS <= held < 1.5 * (r.launches[1][1] - r.launches[1][0])  # about the second launch's hold
    assert sb.slot_get(slot, "held_launches") == 2  # one behind the word, one at launch


@pytest.mark.parametrize("gpu_gate", ["0", "1"])
def test_a_saturated_hp_client_holds_be_without_failing_it_open(daemon, spawn_app, gpu_gate):
    """HP busy for three times TALLY_MAX_HOLD_MS, its work completing all along: BE waits (that is
    what best effort means) and is not failed open; the max hold is for HP work that stops
    completing (test_gpu_gate_fails_open_alone_when_hp_never_completes)."""
    sb = daemon.sb
    hp = hp_client_in_flight(sb)
    app = spawn_app("launch:kernel:1:100:s0", "sync", "launch:kernel:1:0:s1",
                    env=daemon.env("best-effort", TALLY_GPU_GATE=gpu_gate, TALLY_MAX_HOLD_MS="200"))
    k = keep_hp_busy_completing(sb, hp, 0.6)
    # held at launch (launch-level gate), or returned at once and held on the GPU (GPU-side gate)
    assert app.printed("launch i=0 ") == (gpu_gate == "1")
    released = time.monotonic_ns()
    sb.set_lane_completed(hp, 3, k)
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.launches[-1][0] > released


def test_gpu_gate_steps_aside_in_slo_mode(daemon, spawn_app, tmp_path):
    """SLO mode adapts the turnaround budget, which only the launch-level gate applies: from the SLO
    controller's first step on, its warm-up included (no target judged yet), a BE process of the
    GPU-side gate is held at launch instead (no waits)."""
    sb = daemon.sb
    sb.slo_state = sbmod.SLO_STATE_WARMUP  # what the daemon's SLO controller publishes first
    assert sb.slo_target_ns == 0
    hp = hp_client_in_flight(sb)
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:100:s0", f"wait_file:{go}", "sync",
                    env=daemon.env("best-effort", TALLY_GPU_GATE="1"))
    time.sleep(0.2)
    assert not app.printed("launch i=0"), "the launch was not held at the launch-level gate"
    sb.set_lane_completed(hp, 3, 7)
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_waits_issued") == 0 and r.stats()["gpu_gate_waits"] == 0


def test_gpu_gate_is_not_failed_open_by_a_race_with_its_own_waits(daemon, spawn_app):
    """A real HP agent launching short requests with gaps, and a BE process launching as fast as
    it can: the GPU-side gate closes and opens hundreds of times, and no wait is ever held long
    enough to fail the process open. (The race that failed processes open on an H200 is too
    narrow to hit here; test_held_too_long_ignores_a_mark_after_now tests its fix.)"""
    sb = daemon.sb
    sb.idle_window_ns = 20 * 1000
    hp_steps = ["launch:kernel:1:0:s0", "sync"]
    for _ in range(1000):
        hp_steps += ["launch:kernel:1:150:s0", "sync", "sleep:150"]
    hp = spawn_app(*hp_steps, env=daemon.env("high"))
    hp.wait_for("launch i=0")
    sb.hp_active = 1  # what the daemon's tick would count
    be = spawn_app("launch:kernel:100000:2:s0", "sync",
                   env=daemon.env("best-effort", TALLY_GPU_GATE="1", TALLY_MAX_HOLD_MS="60000"))
    r_hp = hp.finish(timeout=120)
    r_be = be.finish(timeout=120)
    completed_ok(r_hp)
    completed_ok(r_be)
    assert r_be.stderr == "" and r_hp.stderr == ""
    assert r_be.stats()["gpu_gate_waits"] == 100000


def test_gpu_gate_child_of_fork_exits(daemon, run_app):
    """A fork while kernels wait on the GPU: the child (no thread, no usable context, no slot) has
    the GPU-side gate off and exits normally; the parent finishes once HP is idle."""
    throttle_be(daemon.sb, 1 * MS)
    r = run_app("launch:kernel:20:500:s0", "fork:2:0", "sync", env=daemon.env("best-effort", TALLY_GPU_GATE="1"),
                timeout=60)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 20
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 20


def test_hp_demoted_by_the_daemon_is_gated_from_its_next_launch(daemon, spawn_app, tmp_path):
    """The daemon's access rules rewrite a slot's priority to best effort: the agent must then
    behave as best effort (held while real HP work is in flight), not keep launching ungated."""
    sb = daemon.sb
    go = tmp_path / "go"
    app = spawn_app("launch:kernel:1:1000:s0", "sync", f"wait_file:{go}", "launch:kernel:1:1000:s0", "sync",
                    env=daemon.env("high"))
    app.wait_for("waiting")
    slot = slot_of(daemon, app.pid)
    hp_before = sb.hp_last_launch_ns
    sb.slot_set(slot, "priority", sbmod.PRIORITY_BEST_EFFORT)  # what the daemon's access check does
    hp = hp_client_in_flight(sb)
    go.touch()
    wait_until(lambda: sb.slot_get(slot, "launches") >= 2, what="the demoted launch to reach the gate")
    time.sleep(0.05)
    assert not app.printed("launch i=1"), "a demoted client launched while HP work was in flight"
    assert sb.hp_last_launch_ns == hp_before  # it no longer resets the idle window others wait for
    released = time.monotonic_ns()
    sb.set_lane_completed(hp, 3, 7)
    r = app.finish()
    completed_ok(r)
    one_warning(r, "runs this program as best effort")
    assert len(r.launches) == 2 and r.launches[0][1] < released < r.launches[1][1]


def test_be_waits_for_the_idle_window(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    window = 300 * MS
    sb.idle_window_ns = window
    sb.hp_active = 1
    last_hp = time.monotonic_ns()
    sb.hp_last_launch_ns = last_hp
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:3:100:s0", "sync"], "best-effort")
    completed_ok(r)
    (first_call, first_ret), *_ = r.launches
    assert first_ret >= last_hp + window  # admitted only once HP was idle for the window
    if first_call < last_hp + window:
        assert c["held_launches"] >= 1 and c["held_ns"] > 0


def test_long_kernels_run_one_at_a_time(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    # Budget 200 us, kernels of 3 ms: once timed, each is a "long kernel".
    throttle_be(sb, 200_000)
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:40:3000:s0", "sync"], "best-effort")
    completed_ok(r)
    assert r.gpu("gpu_kernels") == 40
    assert r.gpu("gpu_max_inflight") == 1  # never two BE kernels on the GPU at once
    assert c["long_kernels"] >= 1  # learned to be longer than the budget, then admitted alone
    assert c["held_launches"] >= 1  # each waited for the previous one's completion


def test_short_kernels_share_the_budget(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    # Budget 50 ms, kernels of 2 ms: once one was timed, several are queued at once.
    throttle_be(sb, 50 * MS)
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:20:2000:s0", "sync"], "best-effort")
    completed_ok(r)
    assert c["long_kernels"] == 0
    assert r.gpu("gpu_max_inflight") >= 2


def test_the_next_kernel_is_queued_just_before_the_running_one_ends(daemon, spawn_app, tmp_path):
    """Budget 6 ms, kernels of 4 ms: two never fit whole, but the next one is admitted once the
    running one has under 2 ms left, so it is queued before the GPU goes idle; never three."""
    sb = daemon.sb
    throttle_be(sb, 6 * MS)
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:30:4000:s0", "sync"], "best-effort")
    completed_ok(r)
    assert r.gpu("gpu_max_inflight") == 2


@pytest.mark.parametrize("batched", [False, True])
def test_batched_completion_writes(daemon, run_app, batched):
    """TALLY_BATCH_WRITES=1: short BE kernels share completion writes (budget 8 ms: groups of
    under 2 ms of estimated work, at most 16 launches), and every kernel still runs and is seen
    complete; without it, one write per launch."""
    throttle_be(daemon.sb, 8 * MS)
    # Group sizes follow the estimates: learned from the (fake) GPU's kernel times they are the
    # kernels' 50 us; poll timing would make them longer, and the groups smaller, under load.
    env = daemon.env("best-effort", TALLY_BATCH_WRITES="1" if batched else None, TALLY_KERNEL_TIMES="1")
    r = run_app("launch:kernel:60:50:s0", "sync", env=env, timeout=60)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 60
    writes = r.gpu("writes_s0")
    if batched:
        assert 60 // 16 <= writes < 60 // 2, writes
    else:
        assert writes == 60
    assert r.gpu("gpu_writes_issued") == r.gpu("gpu_writes_done") == writes


def test_a_deferred_group_is_written_when_the_gate_must_wait(daemon, run_app):
    """A long kernel must run alone: the short kernels before it, whose completion writes were
    deferred, are written as soon as the gate waits for them, so it is admitted at once
    instead of being held until the agent gives up (TALLY_MAX_HOLD_MS, then a warning)."""
    throttle_be(daemon.sb, 8 * MS)
    env = daemon.env("best-effort", TALLY_BATCH_WRITES="1", TALLY_MAX_HOLD_MS="5000")
    # 20 short kernels teach their estimate and leave a group unwritten; the other entry's
    # kernels (20 ms, unknown: estimated at the whole budget) each wait for everything before.
    r = run_app("launch:kernel:20:50:s0", "launch:ex:3:20000:s0", "sync", env=env, timeout=60)
    completed_ok(r)
    assert r.stderr == ""  # no "held for 5000 ms" fail-open warning
    assert r.gpu("gpu_kernels") == 23


@pytest.mark.parametrize("setup", ["no_hp_client", "passthrough"])
def test_be_ungated_pays_nothing(daemon, spawn_app, tmp_path, setup):
    sb = daemon.sb
    if setup == "no_hp_client":
        sb.hp_active = 0
    else:
        hp_client_in_flight(sb)
        sb.policy = sbmod.POLICY_PASSTHROUGH
    started = time.monotonic_ns()
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path,
                                    ["launch:kernel:10:1000:s0", "launch:kernel_ptsz:5:1000:null", "sync"],
                                    "best-effort")
    completed_ok(r)
    assert r.stderr == ""
    assert c["launches"] == 15 and c["held_launches"] == 0 and c["held_ns"] == 0
    # the last launch's time is still kept on this path (from the coarse clock: late by at most a tick)
    assert started - 50 * MS <= c["last_launch_ns"] <= time.monotonic_ns()
    assert r.gpu("gpu_writes_issued") == 0
    assert r.gpu("gpu_capturing_queries") == 0


# ------------------------------------------------------------- fail open

def _fail_open_env(daemon, case: str, tmp_path: Path) -> dict:
    env = daemon.env("best-effort")
    if case == "no_prefix":
        env["TALLY_SCOREBOARD_PREFIX"] = None
    elif case == "missing_file":
        env["TALLY_SCOREBOARD_PREFIX"] = f"{tmp_path}/elsewhere/tally-0-"
    elif case == "other_gpu":
        env["FAKE_CUDA_UUID"] = "GPU-00000000-1111-2222-3333-444444444444"
    elif case == "host_register_fails":
        env["FAKE_CUDA_HOST_REGISTER_RESULT"] = "2"
    return env


@pytest.mark.parametrize("case, fragment", [
    ("no_prefix", "TALLY_SCOREBOARD_PREFIX is not set"),
    ("missing_file", "no tally scoreboard for GPU-5c3c1a2b-0011-2233-4455-66778899aabb"),
    ("other_gpu", "no tally scoreboard for GPU-00000000-1111-2222-3333-444444444444"),
    ("foreign_file", "not one this agent understands"),
    ("short_file", "not one this agent understands"),
    ("wrong_version", "not one this agent understands"),
    ("host_register_fails", "cuMemHostRegister failed"),
    ("no_free_slot", "no free client slot"),
])
@pytest.mark.parametrize("priority", ["best-effort", "high"])
def test_fail_open(daemon, run_app, tmp_path, case, fragment, priority):
    sb = daemon.sb
    hp_client_in_flight(sb)  # a gated BE launch would wait forever
    env = _fail_open_env(daemon, case, tmp_path)
    env["TALLY_PRIORITY"] = priority
    if case in ("foreign_file", "short_file"):
        # a new file under the scoreboard's name (the test's mapping keeps the old one)
        other = tmp_path / "other"
        other.write_bytes(os.urandom(sbmod.TOTAL_SIZE) if case == "foreign_file" else b"TALLYSCB")
        os.replace(other, daemon.path)
    elif case == "wrong_version":
        sb.version = sbmod.VERSION + 1
    elif case == "no_free_slot":
        for _ in range(MAX_CLIENTS - 1):
            sb.claim_slot(os.getpid(), sbmod.PRIORITY_BEST_EFFORT, comm="filler")
    before = {i: sb.slot_state(i) for i in range(MAX_CLIENTS)}
    r = run_app("launch:kernel:5:1000:s0", "launch:graph:1", timeout=30, env=env)
    completed_ok(r)
    one_warning(r, fragment, "high-priority launches are not scheduled" if priority == "high"
                else "best-effort launches are not scheduled")
    assert r.gpu("gpu_writes_issued") == 0
    assert {i: sb.slot_state(i) for i in range(MAX_CLIENTS)} == before  # no slot left claimed


def test_stale_heartbeat_means_ungated(daemon, run_app):
    sb = daemon.sb
    hp_client_in_flight(sb)
    daemon.stop_heartbeat()
    sb.daemon_timeout_ns = 50 * MS
    sb.daemon_heartbeat_ns = time.monotonic_ns() - 10 * 10**9
    r = run_app("launch:kernel:5:1000:s0", "launch:kernel:2:1000:s1", timeout=30, env=daemon.env("best-effort"))
    completed_ok(r)
    one_warning(r, "daemon stopped responding")
    assert r.gpu("gpu_writes_issued") == 0


def test_a_launch_is_never_held_forever(daemon, spawn_app):
    # An HP lane whose completion never comes (a lost write): past the maximum
    # hold the BE process fails open instead of hanging.
    sb = daemon.sb
    hp_client_in_flight(sb)
    app = spawn_app("launch:kernel:3:1000:s0", env=daemon.env("best-effort", TALLY_MAX_HOLD_MS="200"))
    slot = slot_of(daemon, app.pid)
    wait_until(lambda: sb.slot_get(slot, "launches") >= 1, what="the BE launch to reach the gate")
    reached = time.monotonic_ns()
    r = app.finish(timeout=30)
    completed_ok(r)
    one_warning(r, "held for 200 ms", "wait-hp", "best-effort launches are not scheduled")
    assert len(r.launches) == 3
    assert r.launches[0][1] >= reached + 150 * MS  # held until the maximum, not released early
    assert sb.slot_get(slot, "failopen") == 1
    assert r.gpu("gpu_writes_issued") == 0


@pytest.mark.parametrize("gpu_gate", [False, True])
def test_daemon_dying_while_be_is_held_releases_it(daemon, spawn_app, gpu_gate):
    """Held at the gate, or (TALLY_GPU_GATE=1) behind waits on the GPU: a stale heartbeat
    releases the BE work, with one warning."""
    sb = daemon.sb
    timeout = 300 * MS
    sb.daemon_timeout_ns = timeout
    hp_client_in_flight(sb)
    extra = {"TALLY_GPU_GATE": "1"} if gpu_gate else {}
    app = spawn_app("launch:kernel:3:1000:s0", "sync", env=daemon.env("best-effort", **extra))
    slot = slot_of(daemon, app.pid)
    wait_until(lambda: sb.slot_get(slot, "launches") >= (3 if gpu_gate else 1), what="the BE launches")
    last_beat = daemon.stop_heartbeat()
    r = app.finish(timeout=30)
    completed_ok(r)
    one_warning(r, "daemon stopped responding")
    assert len(r.launches) == 3
    assert r.gpu("gpu_writes_issued") == 0
    if gpu_gate:  # the launches returned at once; the GPU held the kernels until the word was cleared
        assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 3
        assert sb.gpu_gate_slots == 0 and time.monotonic_ns() > last_beat + timeout
    else:
        assert r.launches[0][1] > last_beat + timeout  # released because the heartbeat went stale


# ----------------------------------------------------------- stream capture

def test_be_launches_being_captured_are_neither_held_nor_tracked(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    hp_client_in_flight(sb)
    (c, lane_state), r = inspect_while_alive(
        daemon, spawn_app, tmp_path,
        ["capture:s1:on", "launch:kernel:4:1000:s1", "capture:ptds:on", "launch:kernel_ptsz:2:1000:null"],
        "best-effort")
    completed_ok(r)
    assert r.stderr == ""
    assert c["launches"] == 6 and c["held_launches"] == 0
    assert r.gpu("gpu_writes_issued") == 0 and r.gpu("gpu_captured_writes") == 0
    assert all(lane == (0, 0) for lane in lane_state)


def test_hp_launches_being_captured_are_not_tracked(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    go = tmp_path / "go"
    app = spawn_app("capture:s1:on", "launch:kernel:3:1000:s1", f"wait_file:{go}", "capture:s1:off",
                    "launch:kernel:2:1000:s1", "launch:kernel:1:1000:s0", "sync", env=daemon.env("high"))
    app.wait_for("waiting")
    slot = slot_of(daemon, app.pid)
    assert sb.slot_get(slot, "launches") == 3
    assert sb.hp_last_launch_ns == 0  # captured work does not run now: HP is not busy
    assert all(lane == (0, 0) for lane in lanes(sb, slot))
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert r.gpu("gpu_captured_writes") == 0
    assert r.gpu("writes_s1") == 2 and r.gpu("writes_s0") == 1


# ------------------------------------------------------------ default streams

def test_per_thread_default_stream_writes_go_to_stream_0x2(daemon, spawn_app, tmp_path):
    (c, lane_state), r = inspect_while_alive(
        daemon, spawn_app, tmp_path,
        ["launch:kernel_ptsz:4:1000:null", "launch:ex_ptsz:1:1000:null", "launch:kernel:3:1000:null",
         "launch:kernel:2:1000:legacy", "sync"], "high")
    completed_ok(r)
    assert r.gpu("writes_ptds") == 5
    assert r.gpu("writes_null") == r.gpu("writes_legacy") == 5  # NULL and 0x1: the one legacy stream
    assert lane_state[:3] == [(5, 5), (3, 3), (2, 2)]


# ------------------------------------------------------------- many threads

@pytest.mark.parametrize("stream", ["s0", "ptds"])
def test_threads_launching_keep_completions_in_order(daemon, spawn_app, tmp_path, stream):
    """T threads launch HP kernels of different lengths, on one stream or each on
    its own per-thread default stream; completed_seq, sampled meanwhile, never
    goes back and never passes launched_seq, and ends equal to it."""
    sb = daemon.sb
    threads, per_thread = 4, 40
    go = tmp_path / "go"
    app = spawn_app(f"tlaunch:{threads}:kernel:{per_thread}:150:{stream}", "sync", f"wait_file:{go}",
                    env=daemon.env("high"))
    slot = slot_of(daemon, app.pid)
    samples = []
    while not app.printed("waiting") and app.proc.poll() is None:
        samples.append(lanes(sb, slot))
    final = lanes(sb, slot)
    go.touch()
    r = app.finish()
    completed_ok(r)
    assert len(r.launches) == threads * per_thread
    for j in range(MAX_LANES):
        assert all(s[j][1] <= s[j][0] for s in samples), f"lane {j}: completed passed launched"
        completions = [s[j][1] for s in samples]
        assert completions == sorted(completions), f"lane {j}: completed_seq went back"
    used = [lane for lane in final if lane != (0, 0)]
    assert len(used) == (1 if stream == "s0" else threads)  # a per-thread stream is one stream per thread
    assert all(launched == completed for launched, completed in used)
    assert sum(launched for launched, _ in used) == threads * per_thread


# ------------------------------------------------------------- policy tgs

def test_tgs_rate_limits_be_launches_and_tracks_nothing(daemon, spawn_app, tmp_path):
    """Policy tgs: BE launches pass the token bucket at the daemon's rate, are not held for
    HP work in flight (that is the tally policy), and get no completion memops."""
    sb = daemon.sb
    hp_client_in_flight(sb)  # under policy tally this would hold every BE launch
    sb.policy = sbmod.POLICY_TGS
    sb.be_rate_limit_per_s, sb.be_rate_burst = 100, 2  # one launch per 10 ms after a burst of 2
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:12:100:s0", "sync"],
                                    "best-effort")
    completed_ok(r)
    assert r.stderr == ""
    assert c["launches"] == 12 and c["held_launches"] >= 9 and c["held_ns"] > 0
    calls = [int(x) for x in re.findall(r"launch i=\d+ call_ns=(\d+)", r.stdout)]
    assert len(calls) == 12
    # launch k (k >= 1) is admitted no earlier than the first + (k - 1) x 10 ms; the 12th call
    # starts after the 11th was admitted
    assert calls[-1] - calls[0] >= 90 * MS
    assert r.gpu("gpu_writes_issued") == 0


def test_tgs_with_no_limit_or_no_hp_is_ungated(daemon, spawn_app, tmp_path):
    sb = daemon.sb
    sb.policy = sbmod.POLICY_TGS
    sb.be_rate_limit_per_s, sb.be_rate_burst = 1, 1  # would take seconds if it applied
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:5:100:s0", "sync"],
                                    "best-effort")
    completed_ok(r)
    assert c["held_launches"] == 0  # no HP client
    hp_client_in_flight(sb)
    sb.be_rate_limit_per_s = 0  # unlimited
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:5:100:s0", "sync"],
                                    "best-effort")
    completed_ok(r)
    assert c["held_launches"] == 0 and r.gpu("gpu_writes_issued") == 0
