import json
import os
import signal

import pytest

from daemon_helpers import Env


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


