"""The daemon's files in the runtime dir, and how to tell whether a daemon
lives.

A live daemon holds an exclusive flock on `daemon.pid` for its whole life; the
lock, not the pid (which the kernel may hand to another process), is the
truth. `state.json` says what the daemon runs (pid, scoreboards, MPS, metrics)
and is written atomically once the daemon is ready.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path

from tally import paths
from tally.errors import TallyError
from tally.files import write_text_atomic

STATE_FILE = "state.json"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"


def state_path(runtime: Path | None = None) -> Path:
    return (runtime or paths.runtime_dir()) / STATE_FILE


def pid_path(runtime: Path | None = None) -> Path:
    return (runtime or paths.runtime_dir()) / PID_FILE


def log_path(runtime: Path | None = None) -> Path:
    return (runtime or paths.runtime_dir()) / LOG_FILE


def check_owner(directory: Path) -> None:
    """The runtime dir holds the MPS pipe, through which anyone could run work
    as its owner: it must be ours and private."""
    st = directory.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise TallyError(f"runtime dir {directory} is not a directory: remove it or set TALLY_RUNTIME_DIR")
    if st.st_uid != os.getuid():
        raise TallyError(f"runtime dir {directory} is owned by uid {st.st_uid}, not you (uid {os.getuid()}): "
                         "set TALLY_RUNTIME_DIR to a directory of your own")


def ensure_runtime_dir(group: str | None = None) -> Path:
    """The runtime dir, made if needed: mode 0700, or 0750 and owned by
    `group` when the configuration shares the daemon with a group."""
    directory = paths.runtime_dir()
    gid = resolve_group(group) if group else None
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise TallyError(f"cannot create runtime dir {directory}: {exc.strerror}") from None
    check_owner(directory)
    if gid is not None:
        _share(directory, gid, DIR_MODE_GROUP)
    elif stat.S_IMODE(directory.stat().st_mode) != 0o700:
        os.chmod(directory, 0o700)
    return directory


# Modes of the daemon's files when [access] group is configured; without it
# everything is private to the daemon's user (dirs 0700, files 0600).
DIR_MODE_GROUP = 0o750
FILE_MODE_GROUP_READ = 0o640   # state.json, daemon.pid: clients read them
FILE_MODE_GROUP_RW = 0o660     # scoreboards, MPS sockets: clients write them


def resolve_group(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise TallyError(f"access.group {name!r} is not a group on this machine: create it, "
                         "or remove access.group from the config") from None


def _share(path: Path, gid: int, mode: int) -> None:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        if st.st_gid != gid:
            os.chown(path, -1, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        return
    except PermissionError:
        import grp

        name = grp.getgrgid(gid).gr_name
        raise TallyError(f"cannot give group {name} access to {path}: you must be a member of {name}") from None


def share_with_group(runtime: Path, state: dict, group: str) -> None:
    """Opens a running daemon's files to `group`: runtime dir and MPS dirs
    0750, state and pid file 0640, scoreboards and MPS pipes 0660. The log
    stays private."""
    gid = resolve_group(group)
    _share(runtime, gid, DIR_MODE_GROUP)
    for path in (state_path(runtime), pid_path(runtime)):
        _share(path, gid, FILE_MODE_GROUP_READ)
    for gpu in state.get("gpus", []):
        if gpu.get("scoreboard"):
            _share(Path(gpu["scoreboard"]), gid, FILE_MODE_GROUP_RW)
    mps = state.get("mps") or {}
    if mps.get("owned"):
        pipe = Path(mps["pipe_dir"])
        for directory in (pipe.parent, pipe):
            _share(directory, gid, DIR_MODE_GROUP)
        try:
            entries = list(pipe.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            if not entry.is_dir():
                _share(entry, gid, FILE_MODE_GROUP_RW)


def read_state(runtime: Path | None = None) -> dict | None:
    try:
        state = json.loads(state_path(runtime).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: a daemon died while writing, or someone else's file
    return state if _well_formed(state) else {}  # JSON, but not a state object this tally wrote


# The fields every reader relies on, with their types (see TallyDaemon.state()).
_STATE_FIELDS = {"pid": int, "runtime_dir": str, "shm_dir": str, "scoreboard_prefix": str, "gpus": list}


def _well_formed(state) -> bool:
    if not isinstance(state, dict):
        return False
    if any(not isinstance(state.get(name), kind) or isinstance(state.get(name), bool)
           for name, kind in _STATE_FIELDS.items()):
        return False
    if not all(isinstance(g, dict) and isinstance(g.get("uuid"), str) for g in state["gpus"]):
        return False
    mps = state.get("mps")
    return mps is None or (isinstance(mps, dict) and isinstance(mps.get("pipe_dir", ""), str))


def write_state(state: dict, runtime: Path | None = None) -> None:
    # no make_parents: the runtime dir is made (private) by ensure_runtime_dir only
    write_text_atomic(state_path(runtime), json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600,
                      make_parents=False)


def read_pid(runtime: Path | None = None) -> int | None:
    try:
        return int(pid_path(runtime).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def daemon_lock_held(runtime: Path | None = None) -> bool:
    """Whether some process holds the daemon lock, i.e. a daemon lives.
    Probed with a shared lock so a probe never blocks a starting daemon for
    longer than the probe itself."""
    try:
        fd = os.open(pid_path(runtime), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


class DaemonLock:
    """The lock a daemon holds for its life; the pid file carries its pid."""

    def __init__(self, runtime: Path):
        self.path = pid_path(runtime)
        self.fd: int | None = None

    def acquire(self, attempts: int = 50) -> bool:
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        for _ in range(attempts):  # a status probe may hold a shared lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                time.sleep(0.01)
        else:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return True

    def release(self, remove: bool = True) -> None:
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
