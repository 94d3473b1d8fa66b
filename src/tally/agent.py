"""The agent as seen from inside a program it was injected into.

A program started by `tally run` (or `tally trace`) can ask the agent what it
has seen so far, e.g. to count launches over a region of code:

    from tally import agent
    before = agent.counters()
    step()
    after = agent.counters()
    print(after.kernel_launches - before.kernel_launches)
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Counters:
    active: bool  # False when the agent failed open (no CUPTI, profiler conflict)
    kernel_launches: int
    graph_launches: int
    launch_entry_points: int


def _loaded_agent() -> ctypes.CDLL | None:
    path = os.environ.get("CUDA_INJECTION64_PATH")
    if not path:
        return None
    try:
        # RTLD_NOLOAD: only find the copy the CUDA driver already loaded.
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError:
        return None


def counters() -> Counters | None:
    """Launch counts since the agent started in this process, or None when no
    agent is loaded (not started by tally, or CUDA not initialized yet)."""
    lib = _loaded_agent()
    if lib is None or not hasattr(lib, "tally_agent_counters"):
        return None
    out = (ctypes.c_uint64 * 3)()
    active = lib.tally_agent_counters(out)
    return Counters(bool(active), out[0], out[1], out[2])
