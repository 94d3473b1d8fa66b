from __future__ import annotations

import json
import os
import signal

import pytest

from daemon_helpers import Env
from tally.daemon.daemon import Daemon, DaemonConfig


@pytest.fixture
def tally_env(tmp_path, monkeypatch):
    """A private runtime dir, shm dir and two fake GPUs, in os.environ (for
    in-process calls) and in the environment of `tally` subprocesses. Any
    daemon a test leaves behind is stopped."""
    runtime = tmp_path / "run"
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("TALLY_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("TALLY_SHM_DIR", str(shm))
    monkeypatch.setenv("TALLY_FAKE_GPUS", "GPU-aaaa1111,GPU-bbbb2222")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = Env(runtime, shm)
    yield env
    state_file = runtime / "state.json"
    if state_file.exists():
        try:
            os.kill(json.loads(state_file.read_text())["pid"], signal.SIGKILL)
        except (ProcessLookupError, ValueError, KeyError):
            pass
    for proc in env.processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait()




@pytest.fixture
def start_daemon(tmp_path, monkeypatch):
    """start_daemon(params=None): an in-process daemon (no MPS, one fake GPU) and its scoreboard;
    the test drives its tick. Stopped at the end of the test."""
    monkeypatch.setenv("TALLY_SHM_DIR", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    started = []

    def start(params: dict | None = None):
        config = DaemonConfig(gpus=[{"index": 0, "uuid": "GPU-aaaa1111", "name": "fake"}], mps_mode="none",
                              metrics_port=0, **({"params": params} if params else {}))
        daemon = Daemon(config, runtime)
        daemon.start()
        started.append(daemon)
        return daemon, daemon.boards[0]

    yield start
    for daemon in started:
        daemon.shutdown()


@pytest.fixture
def tally_daemon(start_daemon):
    return start_daemon()
