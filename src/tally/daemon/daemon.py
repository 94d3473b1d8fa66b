"""The node daemon: owns the MPS control daemon, one scoreboard per GPU, the
heartbeat, client liveness and the metrics endpoint.

The loop ticks every 10 ms (heartbeat, slot scan) and also wakes the moment a
watched client exits: each client's pid is held as a pidfd in the same poll
set, so a SIGKILLed client's slot is repaired within about a millisecond of
its death rather than at the next tick. Where pidfds are not available
(kernels before 5.3, some seccomp profiles) liveness falls back to reading
/proc/<pid>/stat on every tick, which bounds repair latency by the tick.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import select
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tally import __version__
from tally import scoreboard as sbmod
from tally.daemon import runtime as rt
from tally.daemon import slo as slo_mod
from tally.daemon import tgs as tgs_mod
from tally.errors import TallyError
from tally.mps import ExternalMps, Mps, PrivateMps
from tally.scoreboard import PolicyParams, Scoreboard

DEFAULT_METRICS_PORT = 9478
TICK_NS = 10_000_000
# A repaired slot stays out of use this long: the dead client's CUDA context
# may still be torn down, and a late completion write must not land in a new
# owner's lanes.
QUARANTINE_NS = 1_000_000_000
# A slot claimed (state ACTIVE) whose pid is still 0 after this long belongs
# to an agent that died between its CAS and its pid store.
CLAIM_GRACE_NS = 2_000_000_000

EXIT_ALREADY_RUNNING = 3


class AlreadyRunning(TallyError):
    exit_code = EXIT_ALREADY_RUNNING


LOG_FORMATS = ("text", "json")
_log_format = "text"


def set_log_format(name: str) -> None:
    global _log_format
    if name not in LOG_FORMATS:
        raise TallyError(f"log format {name!r}: expected one of {', '.join(LOG_FORMATS)}")
    _log_format = name


def log(message: str, event: str = "message", **fields) -> None:
    """One line of daemon.log. Text: `<time> tally-daemon[<pid>]: <message>`. JSON (`tally up
    --log-format json`, for log shippers): one object per line with ts (UTC, ISO 8601), level,
    event, pid, msg and the event's own fields, so alerts need no parsing of prose."""
    if _log_format == "json":
        record = {"ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                  "level": "warning" if message.startswith("warning:") else "info", "event": event,
                  "pid": os.getpid(), "msg": message, **fields}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} tally-daemon[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


@dataclass
class DaemonConfig:
    gpus: list[dict]  # [{"index", "uuid", "name"}] as gpus.GpuInfo.to_dict() gives them
    mps_mode: str = "private"  # private | external | none
    mps_pipe_dir: str | None = None
    mps_log_dir: str | None = None
    params: dict = field(default_factory=lambda: asdict(PolicyParams()))
    metrics_host: str = "127.0.0.1"
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 = off
    tick_ns: int = TICK_NS
    quarantine_ns: int = QUARANTINE_NS
    claim_grace_ns: int = CLAIM_GRACE_NS
    slo: dict = field(default_factory=dict)  # SLO mode: tally.daemon.slo.SloParams overrides
    log_format: str = "text"  # text | json (see log)

    @classmethod
    def from_dict(cls, data: dict) -> "DaemonConfig":
        return cls(**data)


# ---------------------------------------------------------------------------
# Process liveness


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: fields resume after the last ')'
    rest = raw[raw.rfind(b")") + 2:].split()
    try:
        return rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):
        return None


def process_gone(pid: int, start_ticks: int = 0) -> bool:
    """Dead, a zombie, or a different process that reuses the pid."""
    st = proc_stat(pid)
    if st is None:
        return True
    state, started = st
    if state in ("Z", "X"):
        return True
    return bool(start_ticks) and started != start_ticks


@dataclass
class Watched:
    pid: int
    claim_ns: int
    pidfd: int | None


# ---------------------------------------------------------------------------
# The daemon


class Daemon:
    def __init__(self, config: DaemonConfig, runtime: Path):
        self.config = config
        self.runtime = runtime
        self.lock = rt.DaemonLock(runtime)
        self.mps: Mps | None = None
        self.boards: list[Scoreboard] = []
        # held by metrics scrapes (another thread) so boards are not closed under them
        self.boards_lock = threading.Lock()
        self.gpus: list[dict] = []
        self.metrics_server = None
        self.stopping = False
        self.started_ns = time.monotonic_ns()
        self.started_wall = time.time()
        self.repairs: dict[str, int] = {}  # per GPU UUID
        self.last_repair_ns: int | None = None
        self._poller = select.poll()
        self._watched: dict[tuple[int, int], Watched] = {}
        self._pidfd_owner: dict[int, tuple[int, int]] = {}
        self._repairing_since: dict[tuple[int, int], int] = {}
        self._pending_since: dict[tuple[int, int], int] = {}
        self._pidfd_ok = hasattr(os, "pidfd_open")
        self.tgs: dict[int, "tgs_mod.TgsController"] = {}  # policy tgs: one controller per board
        self.slo: dict[int, "slo_mod.SloController"] = {}  # SLO mode (policy tally): one per board
        self._busy: dict[int, dict] = {}  # SLO proxy: per board, {client key: BusyTracker}

    # --- startup -------------------------------------------------------

    def start(self) -> None:
        set_log_format(self.config.log_format)
        if not self.lock.acquire():
            raise AlreadyRunning(f"a tally daemon is already running (pid {rt.read_pid(self.runtime)})")
        try:
            self._start_mps()
            self._create_scoreboards()
            self._start_metrics()
            rt.write_state(self.state(), self.runtime)
        except BaseException:
            self.shutdown()
            raise
        policy = sbmod.POLICY_NAMES[self.config.params["policy"]]
        log(f"up: {len(self.boards)} GPU(s), MPS {self.config.mps_mode}, "
            f"metrics {self.metrics_url() or 'off'}, policy {policy}", "up",
            gpus=[b.gpu_uuid for b in self.boards], mps=self.config.mps_mode, metrics=self.metrics_url(),
            policy=policy)

    def _start_mps(self) -> None:
        mode = self.config.mps_mode
        if mode == "private":
            self.mps = PrivateMps(self.runtime).start()
            log(f"started MPS control daemon pid {self.mps.control_pid()} in {self.mps.pipe_dir}", "mps_started",
                mps_pid=self.mps.control_pid(), pipe_dir=str(self.mps.pipe_dir))
        elif mode == "external":
            self.mps = ExternalMps(Path(self.config.mps_pipe_dir),
                                   Path(self.config.mps_log_dir) if self.config.mps_log_dir else None).check()
        elif mode != "none":
            raise TallyError(f"unknown MPS mode {mode!r}")

    def _create_scoreboards(self) -> None:
        params = PolicyParams(**self.config.params)
        for gpu in self.config.gpus:
            path = sbmod.scoreboard_path(gpu["uuid"])
            _refuse_if_owned_by_live_daemon(path)
            board = Scoreboard.create(path, gpu["uuid"], params)
            self.boards.append(board)
            self.gpus.append({**gpu, "scoreboard": str(path)})
            self.repairs[gpu["uuid"]] = 0

    def _start_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        from tally.daemon.metrics import ScoreboardCollector

        registry = CollectorRegistry()
        registry.register(ScoreboardCollector(self))
        try:
            self.metrics_server, _ = start_http_server(self.config.metrics_port, addr=self.config.metrics_host,
                                                       registry=registry)
        except OSError as exc:
            raise TallyError(f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port} "
                             f"({exc.strerror}): pass --metrics-port N, or 0 to turn metrics off") from None

    def metrics_url(self) -> str | None:
        if not self.metrics_server:
            return None
        return f"http://{self.config.metrics_host}:{self.metrics_server.server_port}/metrics"

    def state(self) -> dict:
        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "tally_version": __version__,
            "layout_version": sbmod.VERSION,
            "started_at": self.started_wall,
            "runtime_dir": str(self.runtime),
            "log": str(rt.log_path(self.runtime)),
            "shm_dir": str(sbmod.shm_dir()),
            "scoreboard_prefix": sbmod.scoreboard_prefix(),
            "gpus": self.gpus,
            "mps": self.mps.describe() if self.mps else None,
            "metrics": ({"host": self.config.metrics_host, "port": self.metrics_server.server_port,
                         "url": self.metrics_url()} if self.metrics_server else None),
            "params": self.config.params,
        }

    # --- loop ----------------------------------------------------------

    def request_stop(self, signum=None, frame=None) -> None:
        self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        tick_ms = max(1, self.config.tick_ns // 1_000_000)
        next_tick = time.monotonic_ns()
        try:
            while not self.stopping:
                wait_ms = max(0, (next_tick - time.monotonic_ns()) // 1_000_000)
                try:
                    events = self._poller.poll(wait_ms)
                except InterruptedError:
                    events = []
                exited = {self._pidfd_owner[fd] for fd, _ in events if fd in self._pidfd_owner}
                now = time.monotonic_ns()
                self.tick(now, exited)
                if now >= next_tick:
                    next_tick = now + tick_ms * 1_000_000
        finally:
            self.shutdown()

    def tick(self, now: int, exited: set[tuple[int, int]] = frozenset()) -> None:
        for b, board in enumerate(self.boards):
            board.heartbeat(now)
            hp = be = slo = 0
            hp_busy = False
            for slot in range(sbmod.MAX_CLIENTS):
                key = (b, slot)
                state = board.slot_state(slot)
                if state == sbmod.SLOT_FREE:
                    self._unwatch(key)
                    self._pending_since.pop(key, None)
                    self._repairing_since.pop(key, None)
                elif state == sbmod.SLOT_ACTIVE:
                    if self._check_active(board, key, now, key in exited):
                        if board.slot_get(slot, "priority") == sbmod.PRIORITY_HIGH:
                            hp += 1
                            hp_busy = hp_busy or board.busy(slot)
                            slo += board.slot_get(slot, "slo_p99_ns") != 0
                        else:
                            be += 1
                elif state == sbmod.SLOT_REPAIRING:
                    since = self._repairing_since.setdefault(key, now)
                    if now - since >= self.config.quarantine_ns:
                        board.release_slot(slot)
                        del self._repairing_since[key]
            if hp_busy:
                # BE agents note this too while they wait; the tick covers the times none waits
                board.hp_last_busy_ns = max(board.hp_last_busy_ns, now)
            if board.hp_active != hp:
                board.hp_active = hp
            if board.be_active != be:
                board.be_active = be
            if self.config.params.get("policy") == sbmod.POLICY_TGS:
                self._tgs_tick(b, board, now)
            elif self.config.params.get("policy") == sbmod.POLICY_TALLY and (slo or b in self.slo):
                self._slo_tick(b, board, now, slo)

    def _slo_tick(self, b: int, board: Scoreboard, now: int, with_slo: int) -> None:
        """SLO mode: step the board's budget controller and publish the budget.
        With no HP client with an SLO left, the configured budget is restored
        and the controller dropped."""
        controller = self.slo.get(b)
        if controller is None:
            params = slo_mod.SloParams(**self.config.slo)
            controller = self.slo[b] = slo_mod.SloController(self.config.params["turnaround_budget_ns"], params)
            log(f"SLO mode on for {board.gpu_uuid}", "slo_on", gpu=board.gpu_uuid)
        trackers = self._busy.setdefault(b, {})
        decision = controller.step(slo_mod.sample_board(board, now, trackers))
        slo_mod.apply(board, decision)
        if not with_slo:
            del self.slo[b]
            self._busy.pop(b, None)
            log(f"SLO mode off for {board.gpu_uuid}: budget back to {decision.budget_ns} ns", "slo_off",
                gpu=board.gpu_uuid, budget_ns=decision.budget_ns)

    def _tgs_tick(self, b: int, board: Scoreboard, now: int) -> None:
        """Policy tgs: step the board's rate controller and publish its BE limit."""
        controller = self.tgs.get(b)
        if controller is None:
            controller = self.tgs[b] = tgs_mod.TgsController()
        tgs_mod.apply(board, controller.step(tgs_mod.sample_board(board, now)))

    def _check_active(self, board: Scoreboard, key: tuple[int, int], now: int, exited: bool) -> bool:
        """Whether the slot's client counts as active; repairs it if it died."""
        slot = key[1]
        pid = board.slot_get(slot, "pid")
        if pid == 0:
            since = self._pending_since.setdefault(key, now)
            if now - since >= self.config.claim_grace_ns:
                self._repair(board, key, now, "claimed but never filled in")
            return False
        self._pending_since.pop(key, None)
        claim_ns = board.slot_get(slot, "claim_ns")
        watched = self._watched.get(key)
        if watched is None or (watched.pid, watched.claim_ns) != (pid, claim_ns):
            self._unwatch(key)
            if process_gone(pid, board.slot_get(slot, "pid_start_ticks")):
                self._repair(board, key, now, f"pid {pid} is gone (or now another process)")
                return False
            watched = self._watch(key, pid, claim_ns)
        if exited or (watched.pidfd is None and process_gone(pid)):
            self._repair(board, key, now, f"pid {pid} exited")
            return False
        return True

    def _watch(self, key: tuple[int, int], pid: int, claim_ns: int) -> Watched:
        pidfd = None
        if self._pidfd_ok:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = None  # died just now: the /proc fallback sees it next
            except OSError:
                self._pidfd_ok = False  # ENOSYS / EPERM: poll /proc from now on
        if pidfd is not None:
            self._poller.register(pidfd, select.POLLIN)
            self._pidfd_owner[pidfd] = key
        watched = Watched(pid, claim_ns, pidfd)
        self._watched[key] = watched
        return watched

    def _unwatch(self, key: tuple[int, int]) -> None:
        watched = self._watched.pop(key, None)
        if watched and watched.pidfd is not None:
            self._poller.unregister(watched.pidfd)
            del self._pidfd_owner[watched.pidfd]
            os.close(watched.pidfd)

    def _repair(self, board: Scoreboard, key: tuple[int, int], now: int, why: str) -> None:
        slot = key[1]
        in_flight = board.in_flight(slot)
        board.repair_slot(slot)
        self._unwatch(key)
        self._pending_since.pop(key, None)
        self._repairing_since[key] = now
        self.repairs[board.gpu_uuid] = self.repairs.get(board.gpu_uuid, 0) + 1
        self.last_repair_ns = now
        log(f"repaired slot {slot} on {board.gpu_uuid}: {why}; {in_flight} launches were in flight; "
            f"epoch {board.epoch}", "slot_repaired", gpu=board.gpu_uuid, slot=slot, why=why, in_flight=in_flight,
            epoch=board.epoch)

    # --- shutdown ------------------------------------------------------

    def shutdown(self) -> None:
        """Everything start() made, in reverse; safe to call twice."""
        for board in self.boards:
            # heartbeat 0 tells agents that still map the file to fail open now
            board.daemon_heartbeat_ns = 0
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        for key in list(self._watched):
            self._unwatch(key)
        with self.boards_lock:
            for board in self.boards:
                board.unlink()
                board.close()
            self.boards = []
        if self.mps is not None and self.mps.owned:
            try:
                self.mps.stop()
                log("stopped MPS control daemon", "mps_stopped")
            except TallyError as exc:
                log(f"warning: {exc}", "mps_stop_failed")
        self.mps = None
        rt.state_path(self.runtime).unlink(missing_ok=True)
        if self.lock.fd is not None:
            log("down", "down")
        self.lock.release()


def _refuse_if_owned_by_live_daemon(path: Path) -> None:
    """Another daemon of this user (another runtime dir) may serve this GPU."""
    if not path.exists():
        return
    try:
        with Scoreboard.open(path) as other:
            pid, alive = other.daemon_pid, other.daemon_alive()
    except TallyError:
        return  # not a valid scoreboard: replacing it is safe
    if alive and pid != os.getpid() and not process_gone(pid):
        raise TallyError(f"scoreboard {path} belongs to a running tally daemon (pid {pid}): "
                         "stop it with `tally down` (using its TALLY_RUNTIME_DIR)")


def serve(config: DaemonConfig, runtime: Path) -> None:
    """Runs the daemon in this process until SIGTERM/SIGINT."""
    daemon = Daemon(config, runtime)
    daemon.start()
    daemon.run()
