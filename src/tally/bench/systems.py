"""The sharing systems under test: how each is started and stopped, and what
each role's process gets (environment variables, a command prefix).

  standalone     HP alone and BE alone, in separate runs (the reference)
  time-slicing   two plain processes, no MPS: the driver time-slices contexts
  mps            both processes as clients of a private MPS control daemon
  mps-priority   mps, and the HP worker issues its requests on a stream of the
                 device's greatest priority (TALLY_BENCH_HP_STREAM_PRIORITY=high;
                 done by our worker, not by the user's program)
  mps-split      mps, BE limited by CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (default 50)
  tgs            TGS-style adaptive rate control (NSDI'23) as a policy of the
                 tally agent: `tally up --policy tgs` (the daemon's AIMD
                 controller sets the BE launch rate; docs/scheduling.md)
  tally          `tally up` (daemon, its own MPS), each process under
                 `tally run --priority high|best-effort --`; `tally down` after
  tally-block    tally with block-level scheduling: declared, unavailable yet
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tally.errors import TallyError

HP_STREAM_PRIORITY_ENV = "TALLY_BENCH_HP_STREAM_PRIORITY"

SYSTEM_NAMES = ("standalone", "time-slicing", "mps", "mps-priority", "mps-split", "tgs", "tally", "tally-block")
COLOCATED_SYSTEMS = SYSTEM_NAMES[1:]


@dataclass
class RoleLaunch:
    """What a worker process of one role gets under a system."""

    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)


class System:
    name = ""
    description = ""

    def unavailable_reason(self) -> str | None:
        """None when the system can run; else why not (reported in outputs as 'not run')."""
        return None

    def start(self) -> None:
        """Bring the environment up (daemons). Must be undone by stop() even if it fails halfway."""

    def stop(self) -> None:
        """Tear everything down; safe to call more than once and after a failed start."""

    def launch(self, role: str) -> RoleLaunch:
        return RoleLaunch()

    def counters(self) -> dict[int, dict] | None:
        """Per-process scheduler counters keyed by pid (systems with a scheduler), else None."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description}


class TimeSlicing(System):
    name = "time-slicing"
    description = "two processes, no MPS (driver time-slicing)"


class Standalone(System):
    """Marker: the runner runs each role alone; nothing to start."""

    name = "standalone"
    description = "each workload alone on the GPU"


def load_private_mps():
    """The PrivateMps class of tally.mps (another module of tally; imported when needed)."""
    try:
        from tally.mps import PrivateMps
    except ImportError as exc:
        raise TallyError(f"MPS systems need tally.mps.PrivateMps, which cannot be imported: {exc}") from None
    return PrivateMps


def short_runtime_dir(prefix: str) -> Path:
    # MPS pipes and daemon sockets are Unix sockets: their paths must stay short (108 bytes)
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Mps(System):
    """Private MPS control daemon via tally.mps.PrivateMps(runtime_dir) (context manager; .client_env())."""

    def __init__(self, name: str, hp_high_priority: bool = False, be_thread_percent: int | None = None,
                 mps_factory: Callable | None = None):
        self.name = name
        self.hp_high_priority = hp_high_priority
        self.be_thread_percent = be_thread_percent
        self._factory = mps_factory
        self._mps = None
        self._runtime_dir: Path | None = None
        self._client_env: dict[str, str] = {}
        parts = ["private MPS daemon"]
        if hp_high_priority:
            parts.append("HP requests on the greatest stream priority")
        if be_thread_percent is not None:
            parts.append(f"BE CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={be_thread_percent}")
        self.description = ", ".join(parts)

    def start(self) -> None:
        factory = self._factory or load_private_mps()
        self._runtime_dir = short_runtime_dir("tb-mps-")
        mps = factory(self._runtime_dir)
        mps.__enter__()
        self._mps = mps
        self._client_env = {str(k): str(v) for k, v in mps.client_env().items()}

    def stop(self) -> None:
        mps, self._mps = self._mps, None
        try:
            if mps is not None:
                mps.__exit__(None, None, None)
        finally:
            if self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
                self._runtime_dir = None

    def launch(self, role: str) -> RoleLaunch:
        env = dict(self._client_env)
        if role == "hp" and self.hp_high_priority:
            env[HP_STREAM_PRIORITY_ENV] = "high"
        if role == "be" and self.be_thread_percent is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.be_thread_percent)
        return RoleLaunch(env=env)


class Unavailable(System):
    """A system we declare (so every report lists it) but cannot run yet."""

    def __init__(self, name: str, description: str, reason: str):
        self.name = name
        self.description = description
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason


class Tally(System):
    """End to end through the CLI: `tally up`, `tally run --priority ... --`, `tally down`."""

    name = "tally"
    description = "tally daemon + agent, launch-level scheduling"

    def __init__(self, tally_command: list[str] | None = None, timeout_s: float = 120.0,
                 up_args: list[str] | None = None, name: str | None = None):
        # `python -m tally` rather than a `tally` on PATH: the same installation as this process
        self.tally_command = tally_command or [sys.executable, "-m", "tally"]
        self.up_args = list(up_args or [])
        if name:
            self.name = name
        self.timeout_s = timeout_s
        self._runtime_dir: Path | None = None
        self._up = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        assert self._runtime_dir is not None
        env["TALLY_RUNTIME_DIR"] = str(self._runtime_dir)
        return env

    def _call(self, verb: str, args: list[str] = ()) -> None:
        try:
            proc = subprocess.run(self.tally_command + [verb, *args], env=self._env(), capture_output=True, text=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TallyError(f"`tally {verb}` did not finish within {self.timeout_s:g} s") from None
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise TallyError(f"`tally {verb}` failed (status {proc.returncode}): {lines[-1] if lines else 'no output'}")

    def start(self) -> None:
        # a private runtime dir: our daemon never meets one the user started
        self._runtime_dir = short_runtime_dir("tb-tally-")
        self._up = True  # even a failed `up` may have started something: always `down`
        self._call("up", self.up_args)

    def stop(self) -> None:
        try:
            if self._up:
                self._up = False
                self._call("down")
        finally:
            if self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
                self._runtime_dir = None

    def counters(self) -> dict[int, dict] | None:
        """The daemon's per-client counters (`tally status --json`), keyed by pid; None when
        they cannot be read (a run's numbers never depend on them)."""
        if not self._up:
            return None
        try:
            proc = subprocess.run(self.tally_command + ["status", "--json"], env=self._env(), capture_output=True,
                                  text=True, timeout=30)
            report = json.loads(proc.stdout) if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return None
        if not isinstance(report, dict):
            return None
        from tally.daemon.cli import clients_by_pid

        return clients_by_pid(report)

    def launch(self, role: str) -> RoleLaunch:
        assert self._runtime_dir is not None, "start() first"
        priority = "high" if role == "hp" else "best-effort"
        return RoleLaunch(env={"TALLY_RUNTIME_DIR": str(self._runtime_dir)},
                          prefix=self.tally_command + ["run", "--priority", priority, "--"])


TALLY_BLOCK_REASON = "unavailable: needs block-level scheduling in the agent (PTX slicing/preemption not wired yet)"


# `tally up` options a bench system name may set: tally[budget-us=1000;idle-window-us=2000]
# (';' because system lists are comma-separated)
TALLY_TUNABLES = ("idle-window-us", "budget-us", "unthrottle-ms")


def tally_variant(name: str) -> Tally:
    """A tally system with policy parameters in its name, so each variant is its own run."""
    settings = name[len("tally["):-1]
    args: list[str] = []
    for item in filter(None, settings.split(";")):
        key, sep, value = item.partition("=")
        if not sep or key not in TALLY_TUNABLES:
            raise TallyError(f"system {name!r}: expected KEY=VALUE with KEY one of {', '.join(TALLY_TUNABLES)}")
        try:
            float(value)
        except ValueError:
            raise TallyError(f"system {name!r}: {key} needs a number, not {value!r}") from None
        args += [f"--{key}", value]
    return Tally(up_args=args, name=name)


def make_system(name: str, mps_split_percent: int = 50, mps_factory: Callable | None = None) -> System:
    if name.startswith("tally[") and name.endswith("]"):
        return tally_variant(name)
    if name == "standalone":
        return Standalone()
    if name == "time-slicing":
        return TimeSlicing()
    if name == "mps":
        return Mps("mps", mps_factory=mps_factory)
    if name == "mps-priority":
        return Mps("mps-priority", hp_high_priority=True, mps_factory=mps_factory)
    if name == "mps-split":
        return Mps("mps-split", be_thread_percent=mps_split_percent, mps_factory=mps_factory)
    if name == "tgs":
        tgs = Tally(up_args=["--policy", "tgs"], name="tgs")
        tgs.description = ("TGS-style adaptive rate control of BE launches (NSDI'23): tally agent + daemon, "
                           "`tally up --policy tgs`")
        return tgs
    if name == "tally":
        return Tally()
    if name == "tally-block":
        return Unavailable("tally-block", "tally with block-level scheduling", TALLY_BLOCK_REASON)
    raise TallyError(f"unknown system {name!r} (systems: {', '.join(SYSTEM_NAMES)})")
