"""Helpers for the daemon tests (a unique module name: pytest puts every
test directory on sys.path)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path


class Env:
    def __init__(self, runtime: Path, shm: Path):
        self.runtime = runtime
        self.shm = shm
        self.processes: list[subprocess.Popen] = []

    def tally(self, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout)

    def popen(self, args, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, **kwargs)
        self.processes.append(proc)
        return proc

    def state(self) -> dict | None:
        try:
            return json.loads((self.runtime / "state.json").read_text())
        except FileNotFoundError:
            return None

    def wait_for_state(self, timeout=20, pid=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and (pid is None or state["pid"] == pid):
                return state
            time.sleep(0.02)
        raise AssertionError("daemon did not write its state")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's error contract: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tally: error: "), result.stderr
    return lines[0]
