"""Lane reuse in the agent (agent/sched.c): a slot has 16 lanes, one per
stream with work in flight; a stream that needs a lane when all 16 are
assigned takes over an idle one (every completion written for it has landed),
the least recently used first. Sequence numbers continue in the lane, so its
completed_seq never goes back.

Through the doubles, as in test_sched.py: the test plays the daemon (and, for
best-effort runs, an idle high-priority client, so that BE launches are
tracked); the fake GPU runs each stream's kernels and completion writes in
order and counts any write that would lower a value (gpu_regressions).
"""
from __future__ import annotations

import os
import time

import pytest

from tally import scoreboard as sbmod
from tally.scoreboard import MAX_LANES

from test_sched import completed_ok, inspect_while_alive, lanes, one_warning, slot_of

LANES_WARNING = f"more than {MAX_LANES} streams"


def hp_client_idle(sb) -> int:
    """An HP client with nothing in flight and no recent launch: BE launches
    are admitted (HP idle) and tracked (an HP client exists)."""
    slot = sb.claim_slot(os.getpid(), sbmod.PRIORITY_HIGH, comm="test-hp")
    sb.hp_active = 1
    return slot


def setup_priority(daemon, priority: str) -> None:
    if priority == "best-effort":
        hp_client_idle(daemon.sb)


def tracked(lane_state) -> int:
    return sum(launched for launched, _ in lane_state)


def all_landed(lane_state) -> bool:
    return all(launched == completed for launched, completed in lane_state)


def one_by_one(streams: list[int], per_stream: int, dur_us: int = 100) -> list[str]:
    """Launches on each stream in turn, synchronizing before the next."""
    steps = []
    for k in streams:
        steps += [f"launch:kernel:{per_stream}:{dur_us}:k{k}", "sync"]
    return steps


@pytest.mark.parametrize("priority", ["high", "best-effort"])
def test_forty_streams_one_after_another_are_all_tracked(daemon, spawn_app, tmp_path, priority):
    setup_priority(daemon, priority)
    n, per = 40, 3
    (_, lane_state), r = inspect_while_alive(daemon, spawn_app, tmp_path,
                                             ["streams:40", *one_by_one(list(range(n)), per)], priority)
    completed_ok(r)
    assert r.stderr == ""  # no "more than 16 streams"
    assert tracked(lane_state) == n * per
    assert all_landed(lane_state)
    assert r.gpu("gpu_writes_issued") == n * per
    assert all(r.gpu(f"writes_k{k}") == per for k in range(n))
    # Least recently used first: lane j carries streams j, j + 16, j + 32.
    assert [launched for launched, _ in lane_state] == [3 * per] * 8 + [2 * per] * 8


@pytest.mark.parametrize("priority", ["high", "best-effort"])
def test_a_stream_whose_lane_was_reused_gets_one_again(daemon, spawn_app, tmp_path, priority):
    setup_priority(daemon, priority)
    per = 2
    steps = ["streams:17", *one_by_one(list(range(17)), per), *one_by_one([0], per)]
    (_, lane_state), r = inspect_while_alive(daemon, spawn_app, tmp_path, steps, priority)
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("writes_k0") == 2 * per  # tracked both times
    assert tracked(lane_state) == 18 * per == r.gpu("gpu_writes_issued")
    assert all_landed(lane_state)
    # k16 took k0's lane (the least recently used), then k0 took k1's.
    assert [launched for launched, _ in lane_state] == [2 * per, 2 * per] + [per] * 14


def test_seventeen_busy_streams_warn_once_and_track_sixteen(daemon, spawn_app, tmp_path):
    """17 streams with a long kernel each, all in flight together: no lane is
    idle for the 17th, which stays untracked (one warning). Once the others
    are done, the 17th stream gets a lane."""
    long_us = 2_000_000  # the 17 launches take far less than this
    steps = ["streams:17", *[f"launch:kernel:1:{long_us}:k{k}" for k in range(17)], "sync",
             "launch:kernel:2:100:k16", "sync"]
    (_, lane_state), r = inspect_while_alive(daemon, spawn_app, tmp_path, steps, "high")
    completed_ok(r)
    one_warning(r, LANES_WARNING)
    assert r.gpu("gpu_max_inflight") >= 17  # they really were all in flight at once
    assert all(r.gpu(f"writes_k{k}") == 1 for k in range(16))
    assert r.gpu("writes_k16") == 2  # untracked while all were busy, tracked after
    assert tracked(lane_state) == 18 == r.gpu("gpu_writes_issued")
    assert all_landed(lane_state)
    assert lane_state[0] == (3, 3)  # k16 took the least recently used idle lane: k0's


def test_per_thread_default_streams_of_many_threads_are_all_tracked(daemon, spawn_app, tmp_path):
    """20 threads, alive together, each using its own per-thread default
    stream in turn: 20 streams over the life of the program, at most one busy."""
    threads, per = 20, 3
    (_, lane_state), r = inspect_while_alive(daemon, spawn_app, tmp_path,
                                             [f"tturns:{threads}:kernel:{per}:100:ptds"], "high")
    completed_ok(r)
    assert r.stderr == ""
    assert r.gpu("writes_ptds") == threads * per
    assert tracked(lane_state) == threads * per
    assert all_landed(lane_state)


@pytest.mark.parametrize("priority", ["high", "best-effort"])
@pytest.mark.parametrize("steps, launches, least_tracked", [
    # 8 threads over 24 shared streams, free-running: lanes change hands all
    # the time, and at times more than 16 streams are in flight
    (["streams:24", "tstreams:8:1000:10:24"], 8000, 16),
    # 6 threads over 40 streams, in rounds that end with a synchronization:
    # at most 12 streams in flight, so every launch is tracked
    (["streams:40", "trounds:6:20:10:20:40"], 2400, 2400),
    # two waves of 12 threads on their per-thread default streams: never more
    # than 12 streams in flight, so the second wave is tracked in full
    (["tlaunch:12:kernel:40:30:ptds", "sync", "tlaunch:12:kernel:40:30:ptds"], 960, 960),
    # 24 threads at once on their per-thread default streams: more streams in
    # flight than lanes; whatever is tracked must still be right
    (["tlaunch:24:kernel:40:30:ptds"], 960, 16),
], ids=["shared_streams", "rounds", "ptds_waves", "ptds_crowd"])
def test_threads_on_many_streams_lose_and_misattribute_nothing(daemon, spawn_app, tmp_path, priority, steps,
                                                               launches, least_tracked):
    """Launches race with lanes changing streams. Whatever was tracked is
    consistent: a lane's completed_seq, sampled meanwhile, never goes back and
    never passes launched_seq; the fake GPU saw no completion write lower a
    value; at the end every lane's completions have all landed, and the lanes
    account for every completion write issued."""
    setup_priority(daemon, priority)
    sb = daemon.sb
    go = tmp_path / "go"
    app = spawn_app(*steps, "sync", f"wait_file:{go}", env=daemon.env(priority))
    slot = slot_of(daemon, app.pid)
    samples = []
    while not app.printed("waiting") and app.proc.poll() is None:
        samples.append(lanes(sb, slot))
        time.sleep(0.0005)
    final = lanes(sb, slot)
    go.touch()
    r = app.finish(timeout=60)
    completed_ok(r)
    assert len(r.launches) == launches
    for j in range(MAX_LANES):
        assert all(s[j][1] <= s[j][0] for s in samples), f"lane {j}: completed passed launched"
        completions = [s[j][1] for s in samples]
        assert completions == sorted(completions), f"lane {j}: completed_seq went back"
    assert all_landed(final)
    assert tracked(final) == r.gpu("gpu_writes_issued")
    assert tracked(final) >= least_tracked, f"{tracked(final)} of {launches} launches tracked"
    if least_tracked == launches:
        assert r.stderr == ""
    else:
        assert r.stderr == "" or one_warning(r, LANES_WARNING)
