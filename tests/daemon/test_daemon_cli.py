"""`tally up` / `down` / `status` as a user runs them: real subprocesses, a
real detached daemon, fake GPUs, no MPS."""
import os
import signal
import time

import pytest

from daemon_helpers import one_line_error
from tally import scoreboard as sb

UP = ("up", "--no-mps", "--metrics-port", "0")


def _wait_gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_up_and_down_are_idempotent(tally_env):
    first = tally_env.tally(*UP)
    assert first.returncode == 0, first.stderr
    assert "tally daemon started" in first.stdout
    state = tally_env.state()
    pid = state["pid"]
    boards = [g["scoreboard"] for g in state["gpus"]]
    assert [g["uuid"] for g in state["gpus"]] == ["GPU-aaaa1111", "GPU-bbbb2222"]
    for path in boards:
        with sb.Scoreboard.open(path) as board:
            assert board.daemon_pid == pid and board.daemon_alive()
    assert oct(tally_env.runtime.stat().st_mode & 0o777) == "0o700"

    second = tally_env.tally(*UP)
    assert second.returncode == 0 and f"already running (pid {pid})" in second.stdout
    assert tally_env.state()["pid"] == pid

    down = tally_env.tally("down")
    assert down.returncode == 0 and f"stopped (pid {pid})" in down.stdout, down
    assert _wait_gone(pid)
    assert not any(os.path.exists(p) for p in boards)
    assert tally_env.state() is None and not (tally_env.runtime / "daemon.pid").exists()

    again = tally_env.tally("down")
    assert again.returncode == 0 and "not running" in again.stdout


def test_status_shows_clients_and_json(tally_env):
    assert tally_env.tally(*UP).returncode == 0
    state = tally_env.state()
    with sb.Scoreboard.open(state["gpus"][1]["scoreboard"]) as board:
        slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, comm="pytest")
        board.slot_set(slot, "launches", 1234)
        board.slot_set(slot, "held_ns", 2_500_000)
        board.slot_set(slot, "sliced_launches", 77)
        be = board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, comm="pytest-be")
        board.gpu_gate_slots = 1 << be  # a BE process of the GPU-side gate, its word closed by HP
        board.slot_set(be, "gpu_gate", 12345)
        import json
        result = tally_env.tally("status", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["daemon"]["pid"] == state["pid"]
        clients = report["gpus"][1]["clients"]
        assert [(c["pid"], c["priority"], c["launches"], c["held_ms"], c["sliced_launches"], c["gpu_gate"])
                for c in clients] == [(os.getpid(), "high", 1234, 2.5, 77, None),
                                      (os.getpid(), "best-effort", 0, 0.0, 0, "closed")]
        assert "pytest" in clients[0]["command"] or "python" in clients[0]["command"]
        assert report["gpus"][0]["clients"] == []
        table = tally_env.tally("status", env={"COLUMNS": "200"})
        assert table.returncode == 0 and "GPU-bbbb2222" in table.stdout and str(os.getpid()) in table.stdout
        # a live client makes `down` refuse, unless forced
        refused = tally_env.tally("down")
        assert "still run under the tally daemon" in one_line_error(refused)
        assert "closed" in table.stdout  # the GPU gate column
        board.release_slot(slot)
        board.release_slot(be)
    assert tally_env.tally("down").returncode == 0


def test_status_without_daemon_is_one_line_error(tally_env):
    assert "no tally daemon is running" in one_line_error(tally_env.tally("status"))


def test_stale_daemon_is_cleaned_up_by_up_and_by_down(tally_env):
    assert tally_env.tally(*UP).returncode == 0
    old = tally_env.state()
    os.kill(old["pid"], signal.SIGKILL)
    assert _wait_gone(old["pid"])
    assert "not running but left its files" in one_line_error(tally_env.tally("status"))

    up = tally_env.tally(*UP)
    assert up.returncode == 0, up.stderr
    assert f"tally daemon pid {old['pid']} was not running (stale files); cleaned up" in up.stdout
    new = tally_env.state()
    assert new["pid"] != old["pid"]
    with sb.Scoreboard.open(new["gpus"][0]["scoreboard"]) as board:
        assert board.daemon_pid == new["pid"]

    os.kill(new["pid"], signal.SIGKILL)
    assert _wait_gone(new["pid"])
    down = tally_env.tally("down")
    assert down.returncode == 0 and "was not running (stale files)" in down.stdout
    assert not list(tally_env.shm.iterdir())
    assert tally_env.state() is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_runtime_dir_owned_by_someone_else(tally_env):
    tally_env.runtime.mkdir(mode=0o700)
    os.chown(tally_env.runtime, 12345, 12345)
    for command in (UP, ("down",)):
        line = one_line_error(tally_env.tally(*command))
        assert f"runtime dir {tally_env.runtime} is owned by uid 12345" in line


def test_mps_binaries_missing(tally_env, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    line = one_line_error(tally_env.tally("up", "--metrics-port", "0", env={"TALLY_MPS_BIN_DIR": str(empty)}))
    assert "MPS binaries not found (nvidia-cuda-mps-control, nvidia-cuda-mps-server" in line
    assert "--no-mps" in line
    assert tally_env.state() is None


def test_no_gpu(tally_env):
    line = one_line_error(tally_env.tally(*UP, env={"TALLY_FAKE_GPUS": ""}))
    assert line == "tally: error: no NVIDIA GPU found (nvidia-smi/NVML not available)"


def test_gpu_selection(tally_env):
    line = one_line_error(tally_env.tally(*UP, "--gpus", "7"))
    assert "no GPU '7'" in line and "GPU-aaaa1111" in line
    assert tally_env.tally(*UP, "--gpus", "GPU-bbbb").returncode == 0
    assert [g["uuid"] for g in tally_env.state()["gpus"]] == ["GPU-bbbb2222"]
    assert tally_env.tally("down").returncode == 0


def test_bad_policy_values(tally_env):
    assert "--idle-window-us must not be negative" in one_line_error(tally_env.tally(*UP, "--idle-window-us", "-1"))
    # an idle HP client would hold BE past the agents' max hold (10 s): they would all fail open
    assert "--idle-window-us must be under 10000000 us" in one_line_error(
        tally_env.tally(*UP, "--idle-window-us", "10000000"))
    assert tally_env.tally(*UP, "--idle-window-us", "9999999").returncode == 0
    assert tally_env.tally("down").returncode == 0
    assert "--metrics-port must be in 0..65535" in one_line_error(tally_env.tally(*UP[:2], "--metrics-port", "70000"))


def test_metrics_port_in_use(tally_env):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(tally_env.tally("up", "--no-mps", "--metrics-port", str(port)))
        assert f"metrics port {port} on 127.0.0.1 is not free" in line


@pytest.mark.parametrize("content", ['[1]', 'null', '{"pid": "12"}', '{"pid": 1, "runtime_dir": "/r", "shm_dir": "/s", '
                                     '"scoreboard_prefix": "/s/t-", "gpus": 5}',
                                     '{"pid": 1, "runtime_dir": "/r", "shm_dir": "/s", "scoreboard_prefix": "/s/t-", '
                                     '"gpus": [{"uuid": 7}]}'])
def test_a_malformed_state_file_is_stale_not_a_traceback(tally_env, content):
    tally_env.runtime.mkdir(mode=0o700, exist_ok=True)
    (tally_env.runtime / "state.json").write_text(content)
    status = tally_env.tally("status")
    assert "Traceback" not in status.stderr
    assert "not running but left its files" in one_line_error(status)
    down = tally_env.tally("down")
    assert down.returncode == 0 and "Traceback" not in down.stderr
    assert not (tally_env.runtime / "state.json").exists()
