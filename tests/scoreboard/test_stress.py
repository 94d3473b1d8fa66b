"""Many processes on one scoreboard at once: slot claims, and clients
advancing launched_seq while a fake GPU advances completed_seq."""
import multiprocessing
import os
import random
import time

import pytest

from tally import scoreboard as sb
from tally.errors import TallyError

ctx = multiprocessing.get_context("fork")

CAS_BACKENDS = [
    pytest.param("libatomic", id="libatomic-cas",
                 marks=pytest.mark.skipif(sb._load_libatomic() is None, reason="no libatomic")),
    pytest.param("flock", id="flock-fallback"),
]


def _use_backend(backend):
    sb._libatomic = sb._load_libatomic() if backend == "libatomic" else None


def _claimer(path, backend, rounds, start, results):
    """Claims a slot, stamps it with a token only this process uses, checks
    nobody else stamped over it while it held the slot, releases; repeat."""
    _use_backend(backend)
    board = sb.Scoreboard.open(path)
    start.wait()
    me = os.getpid()
    double_claims = 0
    claimed = []
    for n in range(rounds):
        token = (me << 20) | n
        while True:
            try:
                slot = board.claim_slot(pid=me, priority=n % 2)
                break
            except TallyError:  # all contended slots held right now: retry
                time.sleep(0)
        board.slot_set(slot, "launches", token)
        for _ in range(random.randrange(1, 50)):
            pass
        if board.slot_get(slot, "launches") != token or board.slot_get(slot, "pid") != me:
            double_claims += 1
        claimed.append(slot)
        board.release_slot(slot)
    board.close()
    results.put((me, double_claims, claimed))


@pytest.mark.parametrize("backend", CAS_BACKENDS)
def test_concurrent_claims_never_share_a_slot(board, backend):
    # hold all but 4 slots so 8 claimers fight over 4
    for k in range(sb.MAX_CLIENTS - 4):
        board.claim_slot(pid=1, priority=sb.PRIORITY_HIGH)
    procs, start, results = 8, ctx.Barrier(8), ctx.Queue()
    workers = [ctx.Process(target=_claimer, args=(board.path, backend, 300, start, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=30) for _ in workers]
    for w in workers:
        w.join(10)
        assert w.exitcode == 0
    assert sum(o[1] for o in outcomes) == 0, "a slot was held by two processes at once"
    used = {slot for o in outcomes for slot in o[2]}
    assert used <= set(range(sb.MAX_CLIENTS - 4, sb.MAX_CLIENTS))
    assert len(used) > 1, "claimers never overlapped: the test exercised no contention"
    assert [c["pid"] for c in board.clients()] == [1] * (sb.MAX_CLIENTS - 4)


@pytest.mark.parametrize("backend", CAS_BACKENDS)
def test_all_slots_handed_out_once_under_a_burst(board, backend):
    procs, start, results = 8, ctx.Barrier(8), ctx.Queue()

    def grab(n):
        _use_backend(backend)
        own = sb.Scoreboard.open(board.path)
        start.wait()
        got = [own.claim_slot(pid=os.getpid(), priority=sb.PRIORITY_BEST_EFFORT) for _ in range(n)]
        results.put(got)

    workers = [ctx.Process(target=grab, args=(sb.MAX_CLIENTS // procs,)) for _ in range(procs)]
    for w in workers:
        w.start()
    slots = [s for _ in workers for s in results.get(timeout=30)]
    for w in workers:
        w.join(10)
    assert sorted(slots) == list(range(sb.MAX_CLIENTS))
    # each slot's pid is the process that got it
    owners = {c["slot"]: c["pid"] for c in board.clients()}
    assert len(set(owners.values())) == procs


LANES_USED = 4


def _client(path, launches, ready, done_launching, release):
    board = sb.Scoreboard.open(path)
    slot = board.claim_slot(pid=os.getpid(), priority=sb.PRIORITY_BEST_EFFORT)
    ready.put(slot)
    for seq in range(1, launches + 1):
        board.set_lane_launched(slot, seq % LANES_USED, board.lane(slot, seq % LANES_USED)[0] + 1)
        if seq % 64 == 0:
            time.sleep(0)
    done_launching.put(slot)
    release.wait(30)
    board.release_slot(slot)
    board.close()


def _fake_gpu(path, stop):
    """Completes work in order, never past what was launched, in random steps."""
    board = sb.Scoreboard.open(path)
    rng = random.Random(1)
    while not stop.is_set():
        for slot in board.slots():
            for lane in range(LANES_USED):
                launched, completed = board.lane(slot, lane)
                if completed < launched:
                    board.set_lane_completed(slot, lane, min(launched, completed + rng.randint(1, 7)))
    board.close()


def test_fake_gpu_completion_writer_keeps_invariants(board):
    clients, launches = 3, 20_000
    ready, done, release, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_client, args=(board.path, launches, ready, done, release)) for _ in range(clients)]
    for p in procs:
        p.start()
    slots = sorted(ready.get(timeout=30) for _ in procs)
    gpu = ctx.Process(target=_fake_gpu, args=(board.path, stop))
    gpu.start()

    last = {(s, j): (0, 0) for s in slots for j in range(LANES_USED)}
    samples = in_flight_samples = 0
    finished = set()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        for key in last:
            launched, completed = board.lane(*key)
            assert completed <= launched, f"slot/lane {key}: completed {completed} > launched {launched}"
            prev_launched, prev_completed = last[key]
            assert launched >= prev_launched and completed >= prev_completed, f"slot/lane {key} went backwards"
            last[key] = (launched, completed)
            samples += 1
            in_flight_samples += launched > completed
        while not done.empty():
            finished.add(done.get())
        if len(finished) == clients and all(board.in_flight(s) == 0 for s in slots):
            break
    final = {key: board.lane(*key) for key in last}
    stop.set()
    release.set()
    gpu.join(10)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert len(finished) == clients, "clients did not finish launching"
    assert sum(launched for launched, _ in final.values()) == clients * launches
    assert all(completed == launched for launched, completed in final.values()), "the fake GPU did not catch up"
    assert in_flight_samples > 0, "never saw work in flight: the writers did not run concurrently"
    assert samples > 100
    assert board.clients() == []
