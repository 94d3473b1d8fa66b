"""Starting, stopping and cleaning up after the daemon, from the outside
(`tally up`, `tally down`, `tally run --auto-up`)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tally import gpus as gpumod
from tally import paths
from tally import scoreboard as sbmod
from tally.daemon import runtime as rt
from tally.daemon.daemon import DEFAULT_METRICS_PORT, EXIT_ALREADY_RUNNING, DaemonConfig, process_gone, serve
from tally.errors import TallyError
from tally.mps import ExternalMps, PrivateMps, find_binaries

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 20


@dataclass
class UpOptions:
    gpus: str | None = None
    mps: bool = True
    mps_pipe_dir: str | None = None
    mps_log_dir: str | None = None
    policy: str = "tally"
    idle_window_us: float = 100.0
    budget_us: float = 100.0
    unthrottle_ms: float = 100.0
    daemon_timeout_ms: float = 500.0
    metrics_port: int = DEFAULT_METRICS_PORT
    log_format: str = "text"
    foreground: bool = False
    # from the config files ([access]; see tally.config): share the daemon's
    # files with this group, and demote high-priority clients the rules deny
    group: str | None = None
    high_priority_rules: list = field(default_factory=list)
    slo: dict = field(default_factory=dict)  # [slo]: SloParams overrides


def options_from_config(cli: dict | None = None, given: set[str] | None = None) -> UpOptions:
    """UpOptions from the config files' defaults, overridden by the `cli`
    values whose names are in `given` (all of them when `given` is None)."""
    from tally import config as cfgmod

    cfg = cfgmod.load()
    values = dict(cli or {})
    for name, value in cfg.up_defaults().items():
        if given is None and name in values or given is not None and name in given:
            continue
        values[name] = value
    values["group"] = cfg.group
    values["slo"] = cfg.slo_params()
    values["high_priority_rules"] = [{"source": r.source, "users": r.users, "groups": r.groups}
                                     for r in cfg.rules]
    return UpOptions(**values)


# ---------------------------------------------------------------------------
# Where things stand


def probe(runtime: Path | None = None) -> tuple[str, dict | None]:
    """("running", state), ("starting", None), ("stale", state or {}), or ("none", None)."""
    runtime = runtime or paths.runtime_dir()
    if not runtime.is_dir():
        return "none", None
    state = rt.read_state(runtime)
    if rt.daemon_lock_held(runtime):
        return ("running", state) if state else ("starting", None)
    if state is not None or rt.pid_path(runtime).exists():
        return "stale", state or {}
    return "none", None


# ---------------------------------------------------------------------------
# up


def _policy_params(opts: UpOptions) -> sbmod.PolicyParams:
    policies = {name: value for value, name in sbmod.POLICY_NAMES.items()}
    if opts.policy not in policies:
        raise TallyError(f"--policy must be one of {', '.join(policies)}, not {opts.policy!r}")
    for name, value in (("--idle-window-us", opts.idle_window_us), ("--budget-us", opts.budget_us),
                        ("--unthrottle-ms", opts.unthrottle_ms)):
        if value < 0:
            raise TallyError(f"{name} must not be negative ({value})")
    if opts.daemon_timeout_ms <= 0:
        raise TallyError(f"daemon timeout must be positive ({opts.daemon_timeout_ms} ms)")
    if opts.idle_window_us * 1_000 >= sbmod.AGENT_MAX_HOLD_NS:
        raise TallyError(f"--idle-window-us must be under {sbmod.AGENT_MAX_HOLD_NS // 1_000} us, the agents' "
                         f"max hold: an idle HP client would keep best-effort clients held until they fail open")
    return sbmod.PolicyParams(policy=policies[opts.policy],
                              idle_window_ns=int(opts.idle_window_us * 1_000),
                              turnaround_budget_ns=int(opts.budget_us * 1_000),
                              unthrottle_after_ns=int(opts.unthrottle_ms * 1_000_000),
                              daemon_timeout_ns=int(opts.daemon_timeout_ms * 1_000_000))


def _check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise TallyError(f"metrics port {port} on 127.0.0.1 is not free ({exc.strerror}): "
                             "pass --metrics-port N, or 0 to turn metrics off") from None


def build_config(opts: UpOptions) -> DaemonConfig:
    """Checks everything that can be checked before a daemon starts, so the
    usual mistakes come back as one line from `tally up` itself."""
    params = _policy_params(opts)
    found = gpumod.list_gpus()
    if not found:
        raise TallyError(gpumod.NO_GPU_MESSAGE)
    try:
        selected = gpumod.select(found, opts.gpus)
    except ValueError as exc:
        raise TallyError(str(exc)) from None
    if opts.mps_pipe_dir:
        ExternalMps(Path(opts.mps_pipe_dir), None).check()
        mps_mode = "external"
    elif opts.mps:
        find_binaries()
        mps_mode = "private"
    else:
        mps_mode = "none"
    if not 0 <= opts.metrics_port <= 65535:
        raise TallyError(f"--metrics-port must be in 0..65535, not {opts.metrics_port}")
    if opts.metrics_port:
        _check_port(opts.metrics_port)
    return DaemonConfig(
        gpus=[{"index": g.index, "uuid": g.uuid, "name": g.name} for g in selected],
        mps_mode=mps_mode,
        mps_pipe_dir=str(Path(opts.mps_pipe_dir).resolve()) if opts.mps_pipe_dir else None,
        mps_log_dir=str(Path(opts.mps_log_dir).resolve()) if opts.mps_log_dir else None,
        params=asdict(params),
        metrics_port=opts.metrics_port,
        log_format=opts.log_format,
        slo=dict(opts.slo),
    )


def up(opts: UpOptions, say=print) -> dict | None:
    """Starts the daemon unless one runs; returns its state (None after a
    foreground run, which returns only once the daemon stopped)."""
    runtime = rt.ensure_runtime_dir(group=opts.group)
    status, state = probe(runtime)
    if status == "starting":
        state = _wait_for_state(runtime, None, START_TIMEOUT_S)
        status = "running"
    if status == "running":
        say(f"tally daemon already running (pid {state['pid']})")
        return state
    if status == "stale":
        say(cleanup_stale(state or {}, runtime))
    config = build_config(opts)
    if opts.foreground:
        say(f"tally daemon running in the foreground (pid {os.getpid()}); SIGTERM or Ctrl-C stops it")
        if _access(opts):
            run_daemon(config, runtime, _access(opts))
        else:
            serve(config, runtime)
        return None
    state = _spawn(config, runtime, _access(opts))
    if opts.group:
        rt.share_with_group(runtime, state, opts.group)
    gpus = ", ".join(f"{g['index']}:{g['uuid']}" for g in state["gpus"])
    mps = state["mps"]["pipe_dir"] if state.get("mps") else "off"
    metrics = state["metrics"]["url"] if state.get("metrics") else "off"
    say(f"tally daemon started (pid {state['pid']}); GPUs {gpus}; MPS {mps}; metrics {metrics}")
    return state


def _spawn(config: DaemonConfig, runtime: Path, access: dict | None = None) -> dict:
    log = rt.log_path(runtime)
    argv = [sys.executable, "-m", "tally.daemon", json.dumps(asdict(config))]
    if access:  # the same daemon, plus group sharing and priority enforcement (run_daemon)
        argv = [sys.executable, "-c", "import sys; from tally.daemon.control import daemon_main; "
                "sys.exit(daemon_main(sys.argv[1:]))", json.dumps(asdict(config)), json.dumps(access)]
    with open(log, "w") as log_file:
        os.chmod(log, 0o600)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd="/",
            env={**os.environ, "TALLY_RUNTIME_DIR": str(runtime), "TALLY_SHM_DIR": str(sbmod.shm_dir())},
        )
    return _wait_for_state(runtime, proc, START_TIMEOUT_S)


def _wait_for_state(runtime: Path, proc: subprocess.Popen | None, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = rt.read_state(runtime)
        if state and (proc is None or state.get("pid") == proc.pid):
            return state
        if proc is not None and proc.poll() is not None:
            if proc.returncode == EXIT_ALREADY_RUNNING:
                state = rt.read_state(runtime)
                if state:
                    return state
            raise TallyError(_last_error(rt.log_path(runtime)) or
                             f"tally daemon exited with status {proc.returncode} while starting; "
                             f"see {rt.log_path(runtime)}")
        time.sleep(0.02)
    raise TallyError(f"tally daemon did not come up in {timeout:.0f} s; see {rt.log_path(runtime)}")


def _last_error(log: Path) -> str | None:
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("tally: error: "):
            return line[len("tally: error: "):]
    return None


# ---------------------------------------------------------------------------
# down and cleanup


def _live_clients(state: dict) -> list[tuple[str, int]]:
    found = []
    for gpu in state.get("gpus", []):
        try:
            with sbmod.Scoreboard.open(gpu["scoreboard"]) as board:
                found += [(gpu["uuid"], c["pid"]) for c in board.clients()
                          if c["state"] == sbmod.SLOT_ACTIVE and c["pid"] and not process_gone(c["pid"])]
        except TallyError:
            continue
    return found


def down(force: bool = False, say=print) -> None:
    runtime = paths.runtime_dir()
    if not runtime.is_dir():
        say("tally daemon is not running")
        return
    rt.check_owner(runtime)
    status, state = probe(runtime)
    if status == "none":
        say("tally daemon is not running")
        return
    if status == "stale":
        say(cleanup_stale(state or {}, runtime))
        return
    if status == "starting":
        state = _wait_for_state(runtime, None, START_TIMEOUT_S)
    pid = state["pid"]
    clients = _live_clients(state)
    if clients and not force:
        pids = ", ".join(str(p) for _, p in clients)
        raise TallyError(f"{len(clients)} client(s) still run under the tally daemon (pids {pids}): "
                         "stop them first, or pass --force (they lose MPS and run ungated)")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and rt.daemon_lock_held(runtime):
        time.sleep(0.02)
    if rt.daemon_lock_held(runtime):
        # the lock holder is the daemon named in its own pid file
        if rt.read_pid(runtime) == pid:
            os.kill(pid, signal.SIGKILL)
            while rt.daemon_lock_held(runtime):
                time.sleep(0.02)
        say(f"tally daemon (pid {pid}) did not stop in {STOP_TIMEOUT_S} s: killed it")
    leftovers = cleanup(state, runtime)
    say(f"tally daemon stopped (pid {pid})" + (f"; then {'; '.join(leftovers)}" if leftovers else ""))


def cleanup(state: dict, runtime: Path) -> list[str]:
    """Removes what a daemon that is no longer running left: its private MPS,
    its scoreboards, its state and pid files. Returns what it did."""
    pid = state.get("pid") or rt.read_pid(runtime)
    done = []
    mps = PrivateMps(runtime)
    if mps.pipe_exists() or mps.control_pid():
        try:
            mps.stop()
            done.append("stopped its MPS control daemon")
        except TallyError as exc:
            done.append(f"could not stop its MPS control daemon ({exc})")
    for path in _scoreboards_of(state, pid):
        path.unlink(missing_ok=True)
        done.append(f"removed {path}")
    for path in (rt.state_path(runtime), rt.pid_path(runtime)):
        if path.exists():
            path.unlink()
            done.append(f"removed {path.name}")
    return done


def cleanup_stale(state: dict, runtime: Path) -> str:
    pid = state.get("pid") or rt.read_pid(runtime)
    who = f"tally daemon pid {pid}" if pid else "a tally daemon"
    done = cleanup(state, runtime)
    return f"{who} was not running (stale files); cleaned up" + (": " + "; ".join(done) if done else "")


def _scoreboards_of(state: dict, pid: int | None) -> list[Path]:
    """Scoreboards the dead daemon made: those its state lists, or, with no
    state, those in the shm dir that name it as their daemon."""
    listed = [Path(g["scoreboard"]) for g in state.get("gpus", []) if g.get("scoreboard")]
    candidates = listed or list(sbmod.shm_dir().glob(Path(sbmod.scoreboard_prefix()).name + "*"))
    mine = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            with sbmod.Scoreboard.open(path) as board:
                owner, alive = board.daemon_pid, board.daemon_alive()
        except TallyError:
            if path in listed:
                mine.append(path)
            continue
        if owner == pid or (path in listed and not alive):
            mine.append(path)
    return mine


# ---------------------------------------------------------------------------
# Access control inside the daemon ([access] in the config files)


def _access(opts: UpOptions) -> dict | None:
    """What the daemon process needs of the access configuration, or None
    when there is nothing to enforce (the default: a single-user machine)."""
    if not opts.group and not opts.high_priority_rules:
        return None
    return {"group": opts.group, "rules": opts.high_priority_rules}


class PriorityGuard:
    """Demotes high-priority clients that the access rules do not allow.

    `tally run` checks the rules before it starts a program, but a process
    could claim a high-priority slot without it (it only has to write its own
    slot). The daemon therefore checks the owner (real uid and groups, from
    /proc/<pid>/status) of every high-priority slot and rewrites a denied
    slot's priority to best-effort, which takes it out of `hp_active`: best-
    effort clients are not held for it.
    """

    def __init__(self, rules: list[dict], say=None):
        from tally import config as cfgmod

        self.config = cfgmod.Config(rules=[cfgmod.AccessRule(r["source"], _tuple(r.get("users")),
                                                             _tuple(r.get("groups"))) for r in rules])
        self.say = say or (lambda message: None)
        self._seen: dict[tuple[str, int], tuple[int, int]] = {}  # (gpu, slot) -> (pid, claim_ns) checked

    def check(self, board: sbmod.Scoreboard) -> list[int]:
        """Checks one scoreboard; returns the slots it demoted."""
        from tally import config as cfgmod

        demoted = []
        if not self.config.rules:
            return demoted
        for slot in board.slots():
            if board.slot_state(slot) != sbmod.SLOT_ACTIVE:
                continue
            pid = board.slot_get(slot, "pid")
            if not pid or board.slot_get(slot, "priority") != sbmod.PRIORITY_HIGH:
                continue
            key, claim = (board.gpu_uuid, slot), (pid, board.slot_get(slot, "claim_ns"))
            if self._seen.get(key) == claim:
                continue
            ids = cfgmod.process_ids(pid)
            if ids is None:
                continue  # gone: the daemon's liveness check repairs the slot
            self._seen[key] = claim
            uid, gids = ids
            if self.config.may_run_high(uid, gids):
                continue
            board.slot_set(slot, "priority", sbmod.PRIORITY_BEST_EFFORT)
            demoted.append(slot)
            self.say(f"pid {pid} (user {cfgmod.user_name(uid)}) claimed high priority on {board.gpu_uuid} "
                     "without permission ([access] in the config): demoted to best-effort")
        return demoted


def _tuple(value) -> tuple | None:
    return tuple(value) if value is not None else None


def run_daemon(config: DaemonConfig, runtime: Path, access: dict) -> None:
    """serve(), plus the access configuration: the daemon's files shared with
    a group, and a thread that enforces who may run high priority. Keep in
    step with tally.daemon.daemon.serve() (today: Daemon(...).start(); .run())."""
    import threading

    from tally.daemon.daemon import Daemon, log

    daemon = Daemon(config, runtime)
    daemon.start()
    if access.get("group"):
        try:
            rt.share_with_group(runtime, daemon.state(), access["group"])
        except TallyError:
            daemon.shutdown()
            raise
    guard = PriorityGuard(access.get("rules") or [], say=log)

    def enforce() -> None:
        while not daemon.stopping:
            with daemon.boards_lock:
                for board in daemon.boards:
                    try:
                        guard.check(board)
                    except (TallyError, OSError, ValueError) as exc:
                        log(f"warning: priority check failed: {exc}", "priority_check_failed")
            time.sleep(0.005)

    if guard.config.rules:
        threading.Thread(target=enforce, name="tally-priority-guard", daemon=True).start()
    daemon.run()


def daemon_main(argv: list[str]) -> int:
    """`python -c ... CONFIG_JSON ACCESS_JSON`: the detached daemon when the
    configuration has [access] rules (else `python -m tally.daemon`)."""
    try:
        run_daemon(DaemonConfig.from_dict(json.loads(argv[0])), paths.runtime_dir(), json.loads(argv[1]))
    except TallyError as exc:
        print(f"tally: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0
