"""Reused worker processes (the runner's side of the worker's --control protocol).

A WorkerPool holds the session-mode workers (python -m tally.bench.worker
--control DIR) of one launch group: the processes started under one system
(already started by the runner), at most `cap` live per role. Each worker
builds and warms up once, then runs numbered commands (cmd-N.json -> ack-N,
result file, done-N; see tally.bench.worker). A worker that dies, fails to
start or does not answer in time is stopped (process group killed) and
removed, so the next request for it starts a fresh one; the failure is raised
as RunFailed with the reason and the last line of the worker's log.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tally.files import write_text_atomic

now = time.monotonic


class WorkerFailed(Exception):
    """A reused worker died, failed or did not answer (the run fails; the worker is retired)."""


@dataclass
class WorkerHandle:
    role: str
    ref: str
    proc: subprocess.Popen
    control: Path
    log: Path
    spawned: float
    seq: int = 0
    ready_time: float | None = None
    windows: int = 0  # commands it has run

    @property
    def key(self) -> tuple[str, str]:
        return self.role, self.ref

    def alive(self) -> bool:
        return self.proc.poll() is None


class WorkerPool:
    def __init__(self, spawn: Callable[[str, str, Path, Path], subprocess.Popen], stop: Callable, directory: Path,
                 cap: int, start_timeout_s: float, grace_s: float, last_line: Callable[[Path], str]):
        """spawn(role, ref, control_dir, log) starts one session worker under the group's system;
        stop(proc, grace_s) stops its process group."""
        self._spawn = spawn
        self._stop = stop
        self.dir = directory
        self.cap = max(1, cap)
        self.start_timeout_s = start_timeout_s
        self.grace_s = grace_s
        self._last_line = last_line
        self.live: dict[tuple[str, str], WorkerHandle] = {}  # insertion order = least recently used first
        self.started: list[tuple[str, str]] = []  # every (role, ref) start, for tests and timing
        self._count = 0

    # ---- life
    def ensure(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Make every (role, ref) of `wanted` live (new ones start in parallel, and are waited for);
        evict the least recently used of a role beyond `cap`. Returns {key: started now}."""
        for key in wanted:
            handle = self.live.get(key)
            if handle is not None and not handle.alive():
                self.retire(handle)
        new = [key for key in dict.fromkeys(wanted) if key not in self.live]
        unready = [self.live[key] for key in dict.fromkeys(wanted) if key in self.live
                   and self.live[key].ready_time is None]
        for role in {key[0] for key in new}:
            need = sum(1 for key in new if key[0] == role)
            idle = [h for h in self.live.values() if h.role == role and h.key not in wanted]
            while idle and sum(1 for h in self.live.values() if h.role == role) + need > self.cap:
                self.retire(idle.pop(0), polite=True)
        handles = unready + [self._start(role, ref) for role, ref in new]
        try:
            self._wait_ready(handles)
        finally:
            for key in wanted:  # most recently used last
                if key in self.live:
                    self.live[key] = self.live.pop(key)
        return {key: key in new for key in wanted}

    def _start(self, role: str, ref: str) -> WorkerHandle:
        self._count += 1
        name = f"{role}__{_safe(ref)}__{self._count}"
        control = self.dir / name
        shutil.rmtree(control, ignore_errors=True)  # an earlier invocation's commands must not be replayed
        control.mkdir(parents=True)
        log = self.dir / f"{name}.log"
        log.unlink(missing_ok=True)
        proc = self._spawn(role, ref, control, log)
        handle = WorkerHandle(role, ref, proc, control, log, now())
        self.live[handle.key] = handle
        self.started.append(handle.key)
        return handle

    def _wait_ready(self, handles: list[WorkerHandle]) -> None:
        deadline = now() + self.start_timeout_s
        pending = list(handles)
        while pending:
            for handle in list(pending):
                ready = handle.control / "ready"
                if ready.exists():
                    handle.ready_time = _read_json(ready).get("time", now())
                    pending.remove(handle)
                    continue
                failed = handle.control / "failed"
                if failed.exists() or not handle.alive():
                    reason = _read_json(failed).get("error") if failed.exists() else None
                    self.retire(handle)
                    raise WorkerFailed(f"{handle.role} worker exited (status {handle.proc.returncode}) before it "
                                       f"was ready: {reason or self._last_line(handle.log)}")
            if now() > deadline:
                names = ", ".join(f"{h.role} {h.ref}" for h in pending)
                for handle in pending:
                    self.retire(handle)
                raise WorkerFailed(f"{names} worker(s) not ready within {self.start_timeout_s:g} s")
            time.sleep(0.01)

    def get(self, role: str, ref: str) -> WorkerHandle:
        return self.live[(role, ref)]

    def retire(self, handle: WorkerHandle, polite: bool = False) -> None:
        """Stop a worker (its whole process group) and forget it; `polite`: ask it to exit first."""
        if polite and handle.alive():
            try:
                seq = self.command(handle, {"op": "exit"})
                self.wait(handle, f"done-{seq}.json", min(self.grace_s, 10.0))
                handle.proc.wait(timeout=min(self.grace_s, 10.0))
            except (WorkerFailed, subprocess.TimeoutExpired, OSError):
                pass
        self._stop(handle.proc, self.grace_s)
        if self.live.get(handle.key) is handle:
            del self.live[handle.key]

    def close(self) -> None:
        for handle in list(self.live.values()):
            self.retire(handle, polite=True)

    # ---- commands
    def command(self, handle: WorkerHandle, payload: dict) -> int:
        handle.seq += 1
        handle.windows += payload.get("op") != "exit"
        path = handle.control / f"cmd-{handle.seq}.json"
        write_text_atomic(path, json.dumps(payload, default=str))
        return handle.seq

    def wait(self, handle: WorkerHandle, name: str, timeout_s: float) -> dict:
        """Wait for the worker's file `name` (ack-N / done-N); WorkerFailed if it dies or times out."""
        path = handle.control / name
        deadline = now() + timeout_s
        while True:
            if path.exists():
                return _read_json(path)
            if not handle.alive():
                if path.exists():
                    return _read_json(path)
                rc = handle.proc.returncode
                self.retire(handle)
                raise WorkerFailed(f"{handle.role} worker ({handle.ref}) died (status {rc}) during the run: "
                                   f"{self._last_line(handle.log)}")
            if now() > deadline:
                self.retire(handle)
                raise WorkerFailed(f"{handle.role} worker ({handle.ref}) did not answer ({name}) within "
                                   f"{timeout_s:g} s: {self._last_line(handle.log)}")
            time.sleep(0.002)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._@-" else "_" for c in text)
