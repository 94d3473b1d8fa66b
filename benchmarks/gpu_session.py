"""What the GPU scripts of benchmarks/ share: a tally daemon of their own, with MPS, for the
length of a measurement; one-line errors from a child's output; a report's heading."""
from __future__ import annotations

import subprocess
import sys

TALLY = [sys.executable, "-m", "tally"]


def last_line(text: str | None) -> str:
    """A child's last non-empty output line: its error, without the traceback above it."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def daemon_up(env: dict, *options: str) -> str | None:
    """A fresh daemon with MPS and `tally up` OPTIONS (any daemon left over is stopped first);
    None, or why it did not start."""
    subprocess.run(TALLY + ["down", "--force"], capture_output=True, env=env)
    up = subprocess.run(TALLY + ["up", "--mps", "--metrics-port", "0", *options], capture_output=True, text=True,
                        env=env)
    return None if up.returncode == 0 else f"tally up failed: {last_line(up.stderr)}"


def daemon_down(env: dict) -> None:
    subprocess.run(TALLY + ["down", "--force"], capture_output=True, env=env)


def mps_env() -> dict[str, str]:
    """What a plain client of the running daemon's MPS needs; RuntimeError when there is none."""
    from tally.daemon.client import find_daemon, mps_client_env

    state = find_daemon()
    mps = mps_client_env(state) if state else {}
    if not mps:
        raise RuntimeError("the tally daemon is gone, or runs without MPS")
    return mps


def heading(what: str, environment: dict) -> str:
    return (f"# {what} ({environment.get('date')}, {environment.get('gpu', '?')}, "
            f"driver {environment.get('driver', '?')})")
