"""Client liveness: a SIGKILLed client's slot is repaired at once; a dead
daemon is visible to clients through its heartbeat."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tally import scoreboard as sb
from tally.daemon import client, control
from tally.daemon.daemon import Daemon, DaemonConfig
from tally.errors import TallyError

# A fake client: claims a slot like the agent would, leaves work in flight on
# two lanes, reports its slot, then waits to be killed.
FAKE_CLIENT = """
import os, sys, time
from tally import scoreboard as sb
board = sb.Scoreboard.open(sys.argv[1])
slot = board.claim_slot(os.getpid(), int(sys.argv[2]), comm="fake-client")
board.set_lane_launched(slot, 0, 10); board.set_lane_completed(slot, 0, 3)
board.set_lane_launched(slot, 7, 5)
print(slot, flush=True)
time.sleep(120)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout=5.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def foreground_daemon(tally_env):
    port = _free_port()
    proc = tally_env.popen([sys.executable, "-m", "tally", "up", "--foreground", "--no-mps",
                            "--metrics-port", str(port), "--daemon-timeout-ms", "200"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = tally_env.wait_for_state(pid=proc.pid)
    yield proc, state, port


def _start_client(tally_env, board_path, priority):
    proc = tally_env.popen([sys.executable, "-c", FAKE_CLIENT, str(board_path), str(priority)],
                           stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_sigkilled_client_is_repaired_fast(tally_env, foreground_daemon):
    daemon, state, port = foreground_daemon
    path = state["gpus"][0]["scoreboard"]
    board = sb.Scoreboard.open(path)
    hp, hp_slot = _start_client(tally_env, path, sb.PRIORITY_HIGH)
    be, be_slot = _start_client(tally_env, path, sb.PRIORITY_BEST_EFFORT)
    assert _wait(lambda: (board.hp_active, board.be_active) == (1, 1)), (board.hp_active, board.be_active)
    assert board.in_flight(be_slot) == 12
    epoch = board.epoch

    killed_at = time.monotonic()
    be.send_signal(signal.SIGKILL)  # not reaped: the daemon must see through the zombie
    assert _wait(lambda: board.slot_state(be_slot) != sb.SLOT_ACTIVE, timeout=5, interval=0.0002)
    latency = time.monotonic() - killed_at
    print(f"repair latency {latency * 1e3:.2f} ms")
    assert latency < 1.0, f"repair took {latency:.3f} s"  # 100 ms is the target; CI machines are noisy
    assert board.in_flight(be_slot) == 0 and board.lane(be_slot, 0) == (10, 10)
    assert _wait(lambda: board.epoch == epoch + 1 and board.be_active == 0)
    assert board.hp_active == 1 and board.slot_state(hp_slot) == sb.SLOT_ACTIVE

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'tally_clients{gpu="GPU-aaaa1111",priority="high"} 1.0' in metrics
    assert 'tally_slot_repairs_total{gpu="GPU-aaaa1111"} 1.0' in metrics
    assert f'tally_client_launches_total{{comm="fake-client",gpu="GPU-aaaa1111",pid="{hp.pid}"' in metrics
    # what a Prometheus server parses: prometheus_client's own parser of the exposition format
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("tally_clients", (("gpu", "GPU-aaaa1111"), ("priority", "high")))] == 1.0
    assert samples[("tally_slot_repairs_total", (("gpu", "GPU-aaaa1111"),))] == 1.0
    hp_launches = [v for (name, labels), v in samples.items()
                   if name == "tally_client_launches_total" and ("pid", str(hp.pid)) in labels]
    assert hp_launches and hp_launches[0] >= 0

    # quarantined, then free again
    assert board.slot_state(be_slot) == sb.SLOT_REPAIRING
    assert _wait(lambda: board.slot_state(be_slot) == sb.SLOT_FREE, timeout=5)
    be.wait()
    board.close()


def test_sigterm_stops_cleanly_and_tells_clients(tally_env, foreground_daemon):
    daemon, state, _ = foreground_daemon
    board = sb.Scoreboard.open(state["gpus"][0]["scoreboard"])
    assert board.daemon_alive()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert board.daemon_heartbeat_ns == 0 and not board.daemon_alive()
    assert not list(tally_env.shm.iterdir()) and tally_env.state() is None
    assert not (tally_env.runtime / "daemon.pid").exists()
    board.close()


def test_dead_daemon_is_visible_through_the_heartbeat(tally_env, foreground_daemon):
    daemon, state, _ = foreground_daemon
    board = sb.Scoreboard.open(state["gpus"][0]["scoreboard"])
    before = board.daemon_heartbeat_ns
    assert _wait(lambda: board.daemon_heartbeat_ns > before, timeout=1)  # it ticks
    daemon.kill()
    daemon.wait()
    killed_at = time.monotonic()
    assert _wait(lambda: not board.daemon_alive(), timeout=2)
    assert time.monotonic() - killed_at < 0.2 + 0.1  # daemon_timeout_ms 200, one tick of slack
    assert client.find_daemon() is None
    with pytest.raises(TallyError, match="no tally daemon is running"):
        client.ensure_daemon(auto_up=False)
    board.close()


def test_client_env_points_the_agent_at_the_scoreboard(tally_env, foreground_daemon):
    _, state, _ = foreground_daemon
    found = client.ensure_daemon(auto_up=False)
    assert found["pid"] == state["pid"]
    env = client.client_env(found, "best-effort")
    for gpu in state["gpus"]:
        assert env["TALLY_SCOREBOARD_PREFIX"] + gpu["uuid"] == gpu["scoreboard"]
    assert env["TALLY_SCOREBOARD_PREFIX"] == f"{tally_env.shm}/tally-{os.getuid()}-"
    assert env["TALLY_PRIORITY"] == "best-effort" and env["TALLY_DAEMON_PID"] == str(state["pid"])
    assert "CUDA_MPS_PIPE_DIRECTORY" not in env  # --no-mps
    with pytest.raises(TallyError, match="priority must be one of"):
        client.client_env(found, "urgent")


def test_mps_client_env_is_the_mps_part_of_a_tally_client_env():
    state = {"runtime_dir": "/r", "pid": 7, "scoreboard_prefix": "/dev/shm/t-", "shm_dir": "/dev/shm",
             "mps": {"pipe_dir": "/r/mps/pipe", "log_dir": "/r/mps/log"}}
    plain = client.mps_client_env(state)
    assert plain == {"CUDA_MPS_PIPE_DIRECTORY": "/r/mps/pipe", "CUDA_MPS_LOG_DIRECTORY": "/r/mps/log"}
    be = client.client_env(state, "best-effort")
    assert {k: be[k] for k in plain} == plain and be["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert "CUDA_MPS_CLIENT_PRIORITY" not in client.client_env(state, "high")
    assert client.mps_client_env(dict(state, mps=None)) == {}
    assert "CUDA_MPS_PIPE_DIRECTORY" not in client.client_env(dict(state, mps=None), "best-effort")


def test_auto_up_starts_a_daemon(tally_env):
    with pytest.raises(TallyError, match="no tally daemon is running: start one with `tally up`"):
        client.ensure_daemon(auto_up=False)
    state = client.ensure_daemon(auto_up=True, options=control.UpOptions(mps=False, metrics_port=0))
    assert client.find_daemon()["pid"] == state["pid"]
    control.down(say=lambda message: None)
    assert client.find_daemon() is None


# --- the daemon's liveness rules, driven tick by tick in this process ---------


@pytest.fixture
def inproc_daemon(tally_env):
    config = DaemonConfig(gpus=[{"index": 0, "uuid": "GPU-aaaa1111", "name": "fake"}], mps_mode="none",
                          metrics_port=0, quarantine_ns=50_000_000, claim_grace_ns=100_000_000)
    tally_env.runtime.mkdir(mode=0o700)
    daemon = Daemon(config, tally_env.runtime)
    daemon.start()
    yield daemon, daemon.boards[0]
    daemon.shutdown()


def test_claim_never_filled_in_is_reclaimed(inproc_daemon):
    daemon, board = inproc_daemon
    slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
    board.slot_set(slot, "pid", 0)  # an agent that died between its CAS and its pid store
    now = time.monotonic_ns()
    daemon.tick(now)
    assert board.slot_state(slot) == sb.SLOT_ACTIVE and board.hp_active == 0
    daemon.tick(now + 100_000_000)
    assert board.slot_state(slot) == sb.SLOT_REPAIRING
    daemon.tick(now + 100_000_000 + 50_000_000)
    assert board.slot_state(slot) == sb.SLOT_FREE


def test_reused_pid_is_not_mistaken_for_the_client(inproc_daemon):
    daemon, board = inproc_daemon
    slot = board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, pid_start_ticks=1)  # not our start time
    daemon.tick(time.monotonic_ns())
    assert board.slot_state(slot) == sb.SLOT_REPAIRING
    from tally.daemon.daemon import proc_stat
    good = board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, pid_start_ticks=proc_stat(os.getpid())[1])
    daemon.tick(time.monotonic_ns())
    assert board.slot_state(good) == sb.SLOT_ACTIVE and board.be_active == 1


def test_proc_fallback_without_pidfd(inproc_daemon, tally_env):
    daemon, board = inproc_daemon
    daemon._pidfd_ok = False
    proc, slot = _start_client(tally_env, board.path, sb.PRIORITY_BEST_EFFORT)
    daemon.tick(time.monotonic_ns())
    assert board.be_active == 1 and daemon._watched[(0, slot)].pidfd is None
    proc.kill()
    proc.wait()
    daemon.tick(time.monotonic_ns())
    assert board.slot_state(slot) == sb.SLOT_REPAIRING and board.be_active == 0


def test_clean_release_needs_no_repair(inproc_daemon):
    daemon, board = inproc_daemon
    slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
    daemon.tick(time.monotonic_ns())
    assert board.hp_active == 1
    board.release_slot(slot)
    daemon.tick(time.monotonic_ns())
    assert board.hp_active == 0 and board.epoch == 0 and not daemon._watched


def test_best_effort_clients_get_the_lower_mps_client_priority():
    state = {"scoreboard_prefix": "/dev/shm/tally-0-", "shm_dir": "/dev/shm", "runtime_dir": "/run/tally",
             "pid": 1, "mps": {"pipe_dir": "/run/tally/mps/pipe", "log_dir": "/run/tally/mps/log"}}
    assert client.client_env(state, "best-effort")["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert "CUDA_MPS_CLIENT_PRIORITY" not in client.client_env(state, "high")
    assert client.client_env(state, "high")["CUDA_MPS_PIPE_DIRECTORY"] == "/run/tally/mps/pipe"


def test_tick_notes_when_high_priority_work_was_last_in_flight(inproc_daemon):
    from tally.daemon.daemon import proc_stat

    daemon, board = inproc_daemon
    slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, pid_start_ticks=proc_stat(os.getpid())[1])
    board.set_lane_launched(slot, 0, 2)
    board.set_lane_completed(slot, 0, 1)
    now = time.monotonic_ns()
    daemon.tick(now)
    assert board.hp_active == 1 and board.hp_last_busy_ns == now
    board.set_lane_completed(slot, 0, 2)  # done: later ticks leave the mark where it was
    daemon.tick(now + 10_000_000)
    assert board.hp_last_busy_ns == now


def test_json_log_lines_carry_the_event_and_its_fields(tally_env, capsys):
    import json

    from tally.daemon import daemon as daemon_mod

    config = DaemonConfig(gpus=[{"index": 0, "uuid": "GPU-aaaa1111", "name": "fake"}], mps_mode="none",
                          metrics_port=0, quarantine_ns=50_000_000, claim_grace_ns=100_000_000, log_format="json")
    tally_env.runtime.mkdir(mode=0o700)
    daemon = Daemon(config, tally_env.runtime)
    daemon.start()
    try:
        board = daemon.boards[0]
        slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
        board.slot_set(slot, "pid", 0)  # never filled in: repaired after the claim grace
        now = time.monotonic_ns()
        daemon.tick(now)
        daemon.tick(now + 100_000_000)
    finally:
        daemon.shutdown()
        daemon_mod.set_log_format("text")
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    events = [r["event"] for r in records]
    assert events[0] == "up" and events[-1] == "down" and "slot_repaired" in events
    repair = next(r for r in records if r["event"] == "slot_repaired")
    assert repair["gpu"] == "GPU-aaaa1111" and repair["slot"] == slot and repair["level"] == "info"
    assert {"ts", "pid", "msg"} <= set(repair) and repair["ts"].endswith("+00:00")
    assert records[0]["gpus"] == ["GPU-aaaa1111"] and records[0]["mps"] == "none"


def test_a_log_format_other_than_text_or_json_is_refused(tally_env):
    from tally.daemon import daemon as daemon_mod

    with pytest.raises(TallyError, match="log format 'xml'"):
        daemon_mod.set_log_format("xml")
