"""What `tally run` (and the benchmark harness) needs from the daemon: find
it, start it if asked, and the environment that joins a client to it."""
from __future__ import annotations

from tally import scoreboard as sbmod
from tally.errors import TallyError

NO_DAEMON_MESSAGE = "no tally daemon is running: start one with `tally up` (or pass --auto-up)"

PRIORITIES = {"high": sbmod.PRIORITY_HIGH, "best-effort": sbmod.PRIORITY_BEST_EFFORT}


def find_daemon() -> dict | None:
    """The running daemon's state (see docs/daemon.md), or None."""
    from tally.daemon.control import probe

    status, state = probe()
    return state if status == "running" else None


def version_skew(state: dict) -> tuple[str | None, str | None]:
    """(error, warning) about a running daemon of another tally version.
    An error when its scoreboard layout differs (this tally's agents would
    refuse its scoreboards and run ungated); a warning when only the tally
    version differs (or the daemon is too old to say)."""
    from tally import __version__

    theirs = state.get("tally_version")
    layout = state.get("layout_version")
    restart = "restart it with `tally down` and `tally up`"
    if layout is not None and layout != sbmod.VERSION:
        return (f"the running tally daemon (pid {state.get('pid')}) is tally {theirs or '?'} with scoreboard "
                f"layout {layout}, but this is tally {__version__} with layout {sbmod.VERSION}: {restart}"), None
    if theirs != __version__:
        return None, (f"the running tally daemon (pid {state.get('pid')}) is tally {theirs or '(unknown version)'}, "
                      f"this is tally {__version__}; {restart}")
    return None, None


def client_env(state: dict, priority: str | int) -> dict[str, str]:
    """Environment variables to add to a client's environment so that it
    joins the daemon's MPS and its agent finds the scoreboard of its GPU at
    TALLY_SCOREBOARD_PREFIX + <GPU UUID>."""
    if isinstance(priority, str):
        if priority not in PRIORITIES:
            raise TallyError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        priority_name = priority
    else:
        if priority not in sbmod.PRIORITY_NAMES:
            raise TallyError(f"priority must be one of {sorted(sbmod.PRIORITY_NAMES)}, not {priority!r}")
        priority_name = sbmod.PRIORITY_NAMES[priority]
    env = {
        "TALLY_SCOREBOARD_PREFIX": state["scoreboard_prefix"],
        "TALLY_SHM_DIR": state["shm_dir"],
        "TALLY_RUNTIME_DIR": state["runtime_dir"],
        "TALLY_DAEMON_PID": str(state["pid"]),
        "TALLY_PRIORITY": priority_name,
    }
    mps = mps_client_env(state)
    if mps:
        env.update(mps)
        if priority_name == "best-effort":
            # MPS's own client priority (0 normal, 1 below normal): the one
            # priority that reaches work on PyTorch's legacy default stream,
            # whose stream priority cannot be raised without changing the
            # program's synchronization (docs/scheduling.md).
            env["CUDA_MPS_CLIENT_PRIORITY"] = "1"
    return env


def mps_client_env(state: dict) -> dict[str, str]:
    """What a plain MPS client of the daemon's MPS needs, without joining tally: the
    baseline the benchmarks compare a tally client with (empty without an MPS)."""
    mps = state.get("mps") or {}
    env = {"CUDA_MPS_PIPE_DIRECTORY": mps["pipe_dir"]} if mps.get("pipe_dir") else {}
    if env and mps.get("log_dir"):
        env["CUDA_MPS_LOG_DIRECTORY"] = mps["log_dir"]
    return env


def ensure_daemon(auto_up: bool = False, say=None, options=None) -> dict:
    """The running daemon's state; with auto_up, starts one when none runs
    (with `options`, a tally.daemon.control.UpOptions, or the defaults)."""
    state = find_daemon()
    if state is not None:
        return state
    if not auto_up:
        raise TallyError(NO_DAEMON_MESSAGE)
    from tally.daemon.control import options_from_config, up

    state = up(options or options_from_config(), say=say or (lambda message: None))
    if not state:
        raise TallyError(NO_DAEMON_MESSAGE)
    return state

