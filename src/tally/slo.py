"""Report request latencies of a high-priority server to tally's SLO mode.

A server started with `tally run --priority high --slo-p99-ms X -- CMD` gets
its p99 latency held under X ms by the node daemon, which adapts how much
best-effort work it admits (docs/operations.md, "SLO mode"). Without help the
daemon measures a proxy (the server's GPU busy periods); one line per request
gives it the real latency:

    from tally import slo

    with slo.request():          # times the block
        reply = handle(request)

    slo.report(0.012)            # or report a latency you measured, in seconds

Both are no-ops (a few hundred nanoseconds) when the program does not run
under a tally agent that joined a scoreboard, so the calls can stay in a
server that also runs without tally. The agent joins at the program's first
kernel launch; requests reported before that are not counted.

Each call adds the latency to a log-bucketed histogram in the process's
scoreboard slot (4 buckets per octave, from 8 us to 69 s; the SLO area of
docs/daemon.md). The process is its only writer (a lock orders the threads
of this process); the daemon reads it without locks.
"""
from __future__ import annotations

import ctypes
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from tally import scoreboard as sbmod

_COUNT = 0
_SUM = 1
_HIST = sbmod.SLO.field("req_hist").offset // 8


class Reporter:
    """Writes request latencies into one slot's SLO record.

    `words` is anything indexable as u64 words (a ctypes array over the
    agent's mapping, or a Scoreboard's memoryview) and `base` the index of the
    record's first word in it."""

    def __init__(self, words, base: int = 0):
        self._words = words
        self._base = base
        self._lock = threading.Lock()

    @classmethod
    def for_scoreboard(cls, board: "sbmod.Scoreboard", slot: int) -> "Reporter":
        """A reporter for `slot` of a mapped scoreboard (tests, fake clients)."""
        board._check_slot(slot)
        return cls(board._u64, sbmod.slo_offset(slot) // 8)

    @classmethod
    def at_address(cls, address: int) -> "Reporter":
        """A reporter for the SLO record at `address` in this process's memory."""
        return cls((ctypes.c_uint64 * (sbmod.SLO_SIZE // 8)).from_address(address), 0)

    def report_ns(self, latency_ns: int) -> None:
        latency_ns = max(0, int(latency_ns))
        bucket = self._base + _HIST + sbmod.slo_bucket(latency_ns)
        w, b = self._words, self._base
        with self._lock:
            w[bucket] = w[bucket] + 1
            w[b + _SUM] = (w[b + _SUM] + latency_ns) & 0xFFFF_FFFF_FFFF_FFFF
            w[b + _COUNT] = w[b + _COUNT] + 1


_reporter: Reporter | None = None
_resolve_lock = threading.Lock()
_next_try_ns = 0
RETRY_NS = 100_000_000  # before the agent joined: look for it again at most this often


def _agent_reporter() -> Reporter | None:
    """The reporter for this process's slot, found through the agent
    (tally_agent_slot); None while the agent has not joined a scoreboard."""
    from tally.agent import _loaded_agent

    lib = _loaded_agent()
    if lib is None or not hasattr(lib, "tally_agent_slot"):
        return None
    fn = lib.tally_agent_slot
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    base = ctypes.c_void_p()
    slot = fn(ctypes.byref(base))
    if slot < 0 or not base.value:
        return None
    return Reporter.at_address(base.value + sbmod.slo_offset(slot))


def reporter() -> Reporter | None:
    """This process's reporter, resolved once the agent has joined; None before."""
    global _reporter, _next_try_ns
    if _reporter is None:
        now = time.monotonic_ns()
        if now < _next_try_ns:
            return None
        with _resolve_lock:
            if _reporter is None:
                _reporter = _agent_reporter()
                _next_try_ns = now + RETRY_NS
    return _reporter


def use(r: Reporter | None) -> None:
    """Make report() and request() write through `r` (None: find the agent's
    slot again). For tests and for programs that claim a slot themselves."""
    global _reporter, _next_try_ns
    _reporter = r
    _next_try_ns = 0


def report(latency_s: float) -> None:
    """Report one request's latency, in seconds."""
    r = reporter()
    if r is not None:
        r.report_ns(int(latency_s * 1e9))


@contextmanager
def request() -> Iterator[None]:
    """Time the block as one request (also when it raises)."""
    start = time.monotonic_ns()
    try:
        yield
    finally:
        r = reporter()
        if r is not None:
            r.report_ns(time.monotonic_ns() - start)
