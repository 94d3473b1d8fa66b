"""The MPS control daemon tally runs its clients under.

By default tally starts a private one, with its pipe and log directories under
tally's runtime dir, so it neither needs nor disturbs a system-wide MPS and
never changes GPU settings (compute mode stays as it is). A user with an MPS
already running can point tally at its pipe directory instead.

    with PrivateMps(runtime_dir()) as mps:
        env = {**os.environ, **mps.client_env()}
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tally.errors import TallyError

CONTROL = "nvidia-cuda-mps-control"
SERVER = "nvidia-cuda-mps-server"
# the control daemon writes its pid here, inside its pipe directory
CONTROL_PID_FILE = "nvidia-cuda-mps-control.pid"
# the socket/FIFO clients and `nvidia-cuda-mps-control` talk through
CONTROL_PIPE = "control"


def _search_dirs() -> list[str]:
    explicit = os.environ.get("TALLY_MPS_BIN_DIR")
    if explicit:
        return [explicit]  # an install in an odd place, or a test: look nowhere else
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    dirs += ["/usr/bin", "/usr/local/nvidia/bin"]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        dirs.append(os.path.join(cuda_home, "bin"))
    dirs.append("/usr/local/cuda/bin")
    dirs += sorted(glob.glob("/usr/local/cuda-*/bin"), reverse=True)
    seen: list[str] = []
    for d in dirs:
        if d and d not in seen:
            seen.append(d)
    return seen


def _searched() -> str:
    if os.environ.get("TALLY_MPS_BIN_DIR"):
        return f"TALLY_MPS_BIN_DIR={os.environ['TALLY_MPS_BIN_DIR']}"
    return "PATH, /usr/bin, /usr/local/nvidia/bin and the CUDA toolkit's bin"


@dataclass(frozen=True)
class MpsBinaries:
    control: str
    server: str


def find_binaries() -> MpsBinaries:
    """Both MPS binaries, from one directory where possible (the control
    daemon starts the server it finds next to itself or on PATH)."""
    found: dict[str, str] = {}
    for directory in _search_dirs():
        for name in (CONTROL, SERVER):
            candidate = os.path.join(directory, name)
            if name not in found and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                found[name] = candidate
    missing = [name for name in (CONTROL, SERVER) if name not in found]
    if missing:
        raise TallyError(f"MPS binaries not found ({', '.join(missing)}; searched "
                         f"{_searched()}): install the driver's MPS "
                         "utilities, or run without MPS (`tally up --no-mps`)")
    return MpsBinaries(found[CONTROL], found[SERVER])


def _process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Mps:
    """An MPS control daemon known by its pipe directory."""

    owned = False

    def __init__(self, pipe_dir: Path, log_dir: Path | None, binaries: MpsBinaries | None = None):
        self.pipe_dir = Path(pipe_dir)
        self.log_dir = Path(log_dir) if log_dir else None
        self._binaries = binaries

    @property
    def binaries(self) -> MpsBinaries:
        if self._binaries is None:
            self._binaries = find_binaries()
        return self._binaries

    def env(self) -> dict[str, str]:
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir)}
        if self.log_dir is not None:
            env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        return env

    def client_env(self, active_thread_percentage: int | None = None,
                   pinned_device_mem_limit: str | None = None) -> dict[str, str]:
        """What a client process needs to join this MPS. The thread percentage
        is a static SM cap for this client (a baseline, not tally's policy);
        the memory limit takes MPS's syntax, e.g. "0=8G"."""
        env = self.env()
        if active_thread_percentage is not None:
            if not 1 <= active_thread_percentage <= 100:
                raise TallyError(f"active thread percentage {active_thread_percentage} is not in 1..100")
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(active_thread_percentage)
        if pinned_device_mem_limit is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = pinned_device_mem_limit
        return env

    def control(self, command: str, timeout: float = 10) -> subprocess.CompletedProcess:
        """Sends one command (`get_server_list`, `quit`, ...) to the daemon."""
        return subprocess.run([self.binaries.control], input=command + "\n", capture_output=True, text=True,
                              env={**os.environ, **self.env()}, timeout=timeout)

    def pipe_exists(self) -> bool:
        return (self.pipe_dir / CONTROL_PIPE).exists()

    def is_running(self) -> bool:
        if not self.pipe_exists():
            return False
        pid = self.control_pid()
        if pid is not None and not _process_alive(pid):
            return False
        try:
            return self.control("get_server_list", timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def control_pid(self) -> int | None:
        try:
            return int((self.pipe_dir / CONTROL_PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def server_pids(self) -> list[int]:
        try:
            result = self.control("get_server_list", timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [int(tok) for tok in result.stdout.split() if tok.isdigit()]

    def describe(self) -> dict:
        return {"pipe_dir": str(self.pipe_dir), "log_dir": str(self.log_dir) if self.log_dir else None,
                "owned": self.owned, "control_pid": self.control_pid()}


class ExternalMps(Mps):
    """An MPS the user runs; tally only joins it, and never stops it."""

    def check(self) -> "ExternalMps":
        if not self.pipe_dir.is_dir():
            raise TallyError(f"MPS pipe directory {self.pipe_dir} does not exist")
        if not self.pipe_exists():
            raise TallyError(f"no MPS control daemon listens in {self.pipe_dir} (no '{CONTROL_PIPE}' there)")
        return self


class PrivateMps(Mps):
    """An MPS control daemon tally starts and stops, under `runtime_dir`/mps."""

    owned = True

    def __init__(self, runtime_dir: Path, binaries: MpsBinaries | None = None):
        base = Path(runtime_dir) / "mps"
        super().__init__(base / "pipe", base / "log", binaries)
        self._started_pid: int | None = None
        self._started_created: float | None = None  # its start time: a reused pid is not ours

    def start(self, timeout: float = 15) -> "PrivateMps":
        binaries = self.binaries
        if self.is_running():
            raise TallyError(f"an MPS control daemon already runs in {self.pipe_dir}: "
                             "stop it with `tally down` first")
        for d in (self.pipe_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # stale pipe files from a daemon that died would make the new one refuse to start
        for leftover in self.pipe_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        result = subprocess.run([binaries.control, "-d"], capture_output=True, text=True,
                                env={**os.environ, **self.env()}, timeout=timeout)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise TallyError(f"nvidia-cuda-mps-control -d failed (exit {result.returncode})"
                             + (f": {detail[-1]}" if detail else f"; see {self.log_dir}/control.log"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pipe_exists() and self.control_pid() is not None:
                break
            time.sleep(0.05)
        else:
            raise TallyError(f"MPS control daemon did not come up in {timeout:.0f} s; see {self.log_dir}/control.log")
        self._started_pid = self.control_pid()
        try:
            self._started_created = psutil.Process(self._started_pid).create_time()
        except (psutil.Error, TypeError, ValueError):
            self._started_created = None
        return self

    def _ours(self, pid: int) -> bool:
        """The control daemon this object started (same pid, same start time), whatever
        name it shows; otherwise a process the MPS programs' names identify."""
        if pid == self._started_pid and self._started_created is not None:
            try:
                return psutil.Process(pid).create_time() == self._started_created
            except psutil.Error:
                return False
        return _is_mps_process(pid)

    def stop(self, timeout: float = 10) -> None:
        """quit, wait, verify; signals only for the processes this MPS runs
        (its control daemon, by the pid file in our private pipe dir, and
        the servers it lists)."""
        pid = self._started_pid or self.control_pid()
        if not self.pipe_exists() and (pid is None or not (self._ours(pid) and _process_alive(pid))):
            return
        servers = self.server_pids()
        try:
            self.control("quit", timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        victims = [p for p in ([pid] if pid else []) + servers if self._ours(p)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_process_alive(p) for p in victims):
            time.sleep(0.05)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in victims if _process_alive(p)]
            if not alive:
                break
            for p in alive:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        still = [p for p in victims if _process_alive(p)]
        if still:
            raise TallyError(f"MPS processes {still} did not exit after quit, SIGTERM and SIGKILL")
        (self.pipe_dir / CONTROL_PID_FILE).unlink(missing_ok=True)
        self._started_pid = self._started_created = None

    def __enter__(self) -> "PrivateMps":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _program_names(pid: int) -> set[str]:
    """Every name the process goes by: the kernel's comm is cut to 15
    characters ("nvidia-cuda-mps" for both MPS programs), so the executable
    and argv[0] are asked too."""
    names: set[str] = set()
    try:
        proc = psutil.Process(pid)
        names.add(proc.name())
        for getter in (proc.exe, lambda: (proc.cmdline() or [""])[0]):
            try:
                names.add(os.path.basename(getter()))
            except (psutil.Error, OSError):
                pass
    except psutil.Error:
        pass
    return names


def _is_mps_process(pid: int) -> bool:
    return bool(_program_names(pid) & {CONTROL, SERVER})

