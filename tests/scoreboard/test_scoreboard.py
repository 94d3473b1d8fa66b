"""Creating, opening, validating and using one scoreboard in one process."""
import os
import stat

import pytest

from tally import scoreboard as sb
from tally.errors import TallyError


def test_naming_rule_uses_uid_and_overridable_dir(shm_dir):
    uid = os.getuid()
    assert sb.scoreboard_prefix() == f"{shm_dir}/tally-{uid}-"
    assert sb.scoreboard_path("GPU-abc") == shm_dir / f"tally-{uid}-GPU-abc"
    assert str(sb.scoreboard_path("GPU-abc", uid=7, directory="/dev/shm")) == "/dev/shm/tally-7-GPU-abc"


def test_create_writes_header_and_private_file(board):
    h = board.header()
    assert h["magic"] == sb.MAGIC and h["version"] == sb.VERSION
    assert (h["header_size"], h["slot_size"], h["max_clients"], h["max_lanes"]) == (384, 448, 64, 16)
    assert h["gpu_uuid"] == "GPU-test-0000"
    assert h["daemon_pid"] == os.getpid()
    assert h["policy"] == sb.POLICY_TALLY
    assert h["idle_window_ns"] == 100_000 and h["turnaround_budget_ns"] == 100_000
    assert h["unthrottle_after_ns"] == 100_000_000 and h["daemon_timeout_ns"] == 500_000_000
    st = os.stat(board.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == sb.TOTAL_SIZE
    assert not [p for p in board.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_open_sees_the_creators_writes(board):
    other = sb.Scoreboard.open(board.path)
    try:
        board.hp_active = 3
        board.set_params(sb.PolicyParams(policy=sb.POLICY_PASSTHROUGH, idle_window_ns=5))
        assert other.hp_active == 3 and other.policy == sb.POLICY_PASSTHROUGH and other.idle_window_ns == 5
        other.hp_last_launch_ns = 12345
        assert board.hp_last_launch_ns == 12345
    finally:
        other.close()


def test_uuid_too_long_is_refused(shm_dir):
    with pytest.raises(TallyError, match="does not fit"):
        sb.Scoreboard.create(shm_dir / "x", "GPU-" + "a" * 60)


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _corrupt(p, 0, b"NOTTALLY"), "is not a tally scoreboard"),
    (lambda p: _corrupt(p, 8, (sb.VERSION + 1).to_bytes(4, "little")), f"layout version {sb.VERSION + 1}"),
    (lambda p: _corrupt(p, 16, (999).to_bytes(4, "little")), "corrupt: slot_size=999"),
    (lambda p: os.truncate(p, 4096), "corrupt: file is 4096 bytes"),
    (lambda p: os.truncate(p, 100), "shorter than its header"),
    (lambda p: os.truncate(p, 0), "shorter than its header"),
], ids=["foreign-magic", "wrong-version", "bad-geometry", "truncated", "truncated-header", "empty"])
def test_open_refuses_bad_files_with_one_line(board, damage, message):
    path = board.path
    board.close()
    damage(path)
    with pytest.raises(TallyError, match=message) as info:
        sb.Scoreboard.open(path)
    assert "\n" not in str(info.value)


def test_open_missing_file(shm_dir):
    with pytest.raises(TallyError, match="no scoreboard at"):
        sb.Scoreboard.open(shm_dir / "nothing")


def test_claim_fill_release(board):
    i = board.claim_slot(pid=4242, priority=sb.PRIORITY_BEST_EFFORT, comm="train.py-with-a-long-name")
    j = board.claim_slot(pid=4343, priority=sb.PRIORITY_HIGH, comm="serve")
    assert i != j
    c = board.client(i)
    assert (c["state"], c["pid"], c["priority"]) == (sb.SLOT_ACTIVE, 4242, sb.PRIORITY_BEST_EFFORT)
    assert c["comm"] == "train.py-with-a"  # 15 bytes + NUL
    assert c["claim_ns"] > 0 and c["priority_name"] == "best-effort"
    assert [c["pid"] for c in board.clients()] == [4242, 4343]
    board.slot_set(i, "launches", 10)
    board.set_lane_launched(i, 2, 7)
    board.release_slot(i)
    assert board.slot_state(i) == sb.SLOT_FREE
    assert board.slot_get(i, "launches") == 0 and board.lane(i, 2) == (0, 0)
    assert [c["pid"] for c in board.clients()] == [4343]


def test_claim_until_full(board):
    slots = [board.claim_slot(pid=1000 + k, priority=k % 2) for k in range(sb.MAX_CLIENTS)]
    assert sorted(slots) == list(range(sb.MAX_CLIENTS))
    with pytest.raises(TallyError, match="full"):
        board.claim_slot(pid=1, priority=sb.PRIORITY_HIGH)


def test_repair_completes_lanes_and_bumps_epoch(board):
    i = board.claim_slot(pid=99, priority=sb.PRIORITY_HIGH)
    board.set_lane_launched(i, 0, 10)
    board.set_lane_completed(i, 0, 4)
    board.set_lane_launched(i, 5, 3)
    assert board.in_flight(i) == 9
    epoch = board.epoch
    board.repair_slot(i)
    assert board.in_flight(i) == 0 and board.lane(i, 0) == (10, 10)
    assert board.slot_state(i) == sb.SLOT_REPAIRING and board.epoch == epoch + 1
    # a repaired slot is not claimable until released
    j = board.claim_slot(pid=100, priority=sb.PRIORITY_HIGH)
    assert j != i
    board.release_slot(i)
    assert board.claim_slot(pid=101, priority=sb.PRIORITY_HIGH) == i


def test_busy_counts_lanes_in_flight_and_launch_calls_in_progress(board):
    """What the daemon's HP-busy flag and SLO mode's busy periods read: the gate's notion of busy."""
    i = board.claim_slot(pid=99, priority=sb.PRIORITY_HIGH)
    assert not board.busy(i)
    board.slot_set(i, "launching", 1)  # a graph launch between API enter and exit
    assert board.busy(i) and board.in_flight(i) == 0
    board.slot_set(i, "launching", 0)
    board.set_lane_launched(i, 2, 5)
    board.set_lane_completed(i, 2, 4)
    assert board.busy(i)
    board.set_lane_completed(i, 2, 5)
    assert not board.busy(i)


def test_heartbeat_and_daemon_alive(board):
    now = board.heartbeat()
    assert board.daemon_heartbeat_ns == now and board.daemon_alive()
    assert not board.daemon_alive(now + board.daemon_timeout_ns + 1)
    board.daemon_heartbeat_ns = 0
    assert not board.daemon_alive()


def test_close_is_idempotent(board):
    board.claim_slot(pid=1, priority=0)  # maps the buffer for CAS too
    board.close()
    board.close()


def test_gpu_gate_state_names():
    assert sb.gpu_gate_state(0, in_use=False) is None
    assert sb.gpu_gate_state(0, in_use=True) == "closed"  # a new word: closed until the agent looks at HP
    assert sb.gpu_gate_state(12345, in_use=True) == "closed"
    assert sb.gpu_gate_state(sb.GPU_GATE_OPEN, in_use=True) == "open"
    assert sb.gpu_gate_state(sb.GPU_GATE_DISABLED, in_use=False) == "disabled"
