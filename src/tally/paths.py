"""Where tally keeps its files. One place, so the daemon, the agent's
environment and the tests agree."""
from __future__ import annotations

import os
from pathlib import Path


def runtime_dir() -> Path:
    """Sockets, scoreboards, the MPS pipe and log dirs, the daemon's pid file."""
    explicit = os.environ.get("TALLY_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "tally"
    return Path("/tmp") / f"tally-{os.getuid()}"


def cache_dir() -> Path:
    """Kernel profiles and transformed kernels; safe to delete."""
    explicit = os.environ.get("TALLY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "tally"
