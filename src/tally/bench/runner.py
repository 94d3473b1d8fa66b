"""Orchestration: baselines, co-located runs, resume, cleanup.

Layout of an output directory (everything is JSON; a run whose file exists
with status "ok" is skipped on the next invocation, so an interrupted or
partial benchmark resumes):

  environment.json                      host, GPU, driver, versions (first run)
  capacity/<hp>.json                    standalone service time of an HP workload
  arrivals/<hp>__load<L>.json           the arrival trace every system replays
  standalone/hp__<hp>__load<L>.json     HP alone on that trace (raw worker result)
  standalone/be__<be>.json              BE alone (raw worker result)
  runs/<hp>__<be>__<system>__load<L>.json   one co-located run: summary + HP latencies
  raw/<run id>/{hp,be}.json, *.log      worker results and logs
  report.md, summary.json, charts/*.png written by tally.bench.report

A co-located run: start the system; start BE and HP workers together (both
build and warm up in parallel); when both have written their ready file,
create the go file; the HP worker replays the arrivals; when it exits, SIGTERM
the BE worker (it writes its step times); stop the system. Every process is
started in its own session and killed as a process group; the system is
stopped in `finally`, on errors and on Ctrl-C (SIGINT) or SIGTERM alike.

Python API: `run_pair(hp, be, system, load, duration, out_dir) -> dict`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tally.bench import metrics
from tally.bench import systems as systems_mod
from tally.bench import traces
from tally.bench import workloads as registry
from tally.bench.pool import WorkerFailed, WorkerPool
from tally.errors import TallyError
from tally.files import write_text_atomic

now = time.monotonic


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text)


def system_slug(name: str) -> str:
    """A file-name-safe form of a system name: tally[budget-us=1000;idle-window-us=2000] ->
    tally_budget-us-1000_idle-window-us-2000 (no brackets, '=' or ';' in paths)."""
    text = name.replace("=", "-").replace(";", "_").replace("[", "_").replace("]", "")
    return _slug(text).strip("_") or "_"


def _load_tag(load: float) -> str:
    return f"load{load:g}"


@dataclass
class BenchConfig:
    out_dir: Path
    duration_s: float = 20.0
    arrival_source: str = "bursty"  # azure | bursty | poisson
    trace_path: str | None = None
    trace_function: str | None = None
    trace_window: tuple[float | None, float | None] = (None, None)
    seed: int = 0
    warmup_steps: int = 5
    warmup_s: float = 2.0
    capacity_s: float = 3.0
    start_timeout_s: float = 900.0  # torch.compile variants warm up for minutes
    stop_grace_s: float = 15.0
    mps_split_percent: int = 50
    hp_command: str | None = None
    be_command: str | None = None
    hp_options: list[str] = field(default_factory=list)
    be_options: list[str] = field(default_factory=list)
    sample_gpu: bool = True
    python: str = sys.executable
    startup_estimate_s: float = 15.0  # per worker start (torch import, model build, warm-up), for the ETA
    mps_factory: Callable | None = None  # tests inject a fake PrivateMps
    tally_command: list[str] | None = None  # how tally systems call the CLI (default `python -m tally`; tests: a fake)
    # run_matrix reuses worker processes (one build + warm-up per workload per system; see
    # docs/bench.md "How runs are scheduled"); run() / run_pair() and command workloads run one
    # process pair per run
    reuse_workers: bool = True
    reuse_cap: int = 2          # live workers per role per system (tally/tgs: always 1)
    rewarm_steps: int = 1       # warm-up of a reused worker before each window ...
    rewarm_s: float = 0.25      # ... at least this many steps and seconds


@dataclass(frozen=True)
class RunKey:
    hp: str
    be: str
    system: str
    load: float

    @property
    def run_id(self) -> str:
        """The run's file name stem: system variants such as tally[budget-us=1000;idle-window-us=2000]
        are slugged (tally_budget-us-1000_idle-window-us-2000); JSON keeps the display name in `key`."""
        return f"{_slug(self.hp)}__{_slug(self.be)}__{system_slug(self.system)}__{_load_tag(self.load)}"

    @property
    def legacy_run_id(self) -> str:
        """The name earlier versions used (the system name verbatim), read when resuming."""
        return f"{_slug(self.hp)}__{_slug(self.be)}__{self.system}__{_load_tag(self.load)}"


# ---------------------------------------------------------------- processes


class ProcessSet:
    """Every child process of the runner; each in its own session, killed as a group."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []
        self.spawned_pids: list[int] = []

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path, **kwargs) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            try:
                proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
            except OSError as exc:
                raise TallyError(f"cannot start {argv[0]}: {exc}") from None
        self.live.append(proc)
        self.spawned_pids.append(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float, sig: int = signal.SIGTERM) -> int | None:
        """Signal the group, wait `grace_s`, then SIGKILL the group; reap."""
        if proc.poll() is None:
            _killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # the leader may be gone while others of its group live on
        _killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.live:
            self.live.remove(proc)
        return proc.returncode

    def stop_all(self, grace_s: float) -> None:
        for proc in list(self.live):
            if proc.poll() is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = now() + grace_s
        for proc in list(self.live):
            try:
                proc.wait(timeout=max(0.1, deadline - now()))
            except subprocess.TimeoutExpired:
                pass
            self.stop(proc, 0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the runner unwinds like Ctrl-C, so `finally` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _number(text: str) -> float:
    """A sampled value, NaN where nvidia-smi has none ("[N/A]")."""
    try:
        return float(text)
    except ValueError:
        return math.nan


class GpuSampler:
    """`nvidia-smi --query-gpu=utilization.gpu -lms` in the background, each line stamped on arrival.

    NVML's utilization.gpu is the share of time *some* kernel ran during the
    sample period, not SM occupancy: coarse, but the same for every system.
    """

    def __init__(self, processes: ProcessSet, interval_ms: int = 200):
        self.samples: list[tuple[float, ...]] = []  # (time, utilization %, SM clock MHz, power W)
        self._processes = processes
        self._proc: subprocess.Popen | None = None
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return
        self._proc = subprocess.Popen(
            [smi, "--query-gpu=utilization.gpu,clocks.sm,power.draw", "--format=csv,noheader,nounits",
             f"-lms={interval_ms}", "-i", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        processes.live.append(self._proc)
        processes.spawned_pids.append(self._proc.pid)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                fields = line.strip().split(",")
                values = [float(fields[0])] + [_number(f) for f in fields[1:3]]
            except ValueError:
                continue
            self.samples.append((now(), *values))

    def stop(self) -> None:
        if self._proc is not None:
            self._processes.stop(self._proc, 2)
            self._proc = None


# ---------------------------------------------------------------- the runner


class RunFailed(Exception):
    pass


class Runner:
    def __init__(self, config: BenchConfig, progress: Callable[[str], None] | None = None):
        self.config = config
        self.out = Path(config.out_dir)
        self.processes = ProcessSet()
        self.say = progress or (lambda message: None)
        self._trace: traces.AzureTrace | None = None
        self.last_timing: dict | None = None  # where the last co-located run's time went
        self.last_scheduler: dict | None = None  # scheduler counters of the last window (tally systems)
        self.worker_starts: list[tuple[str, str, str]] = []  # (group, role, ref) of reused workers started
        self._baseline_failures: dict[str, str] = {}  # baseline path -> reason (reuse mode)
        self.last_agent_stats: dict | None = None  # the BE agent's stats file of the last one-shot run
        self.last_be_handle = None  # the BE worker of the last window (reuse mode)
        self._worker_stats_dirs: dict[int, Path] = {}  # reused worker pid -> its agent stats dir
        self._stats_pending: list[tuple[Path, object]] = []  # (run JSON, BE worker handle): stats at its exit

    def _make_system(self, name: str) -> systems_mod.System:
        return systems_mod.make_system(name, self.config.mps_split_percent, self.config.mps_factory,
                                       self.config.tally_command)

    # ---- paths
    def capacity_path(self, hp: str) -> Path:
        return self.out / "capacity" / f"{_slug(hp)}.json"

    def arrivals_path(self, hp: str, load: float) -> Path:
        return self.out / "arrivals" / f"{_slug(hp)}__{_load_tag(load)}.json"

    def hp_alone_path(self, hp: str, load: float) -> Path:
        return self.out / "standalone" / f"hp__{_slug(hp)}__{_load_tag(load)}.json"

    def be_alone_path(self, be: str) -> Path:
        return self.out / "standalone" / f"be__{_slug(be)}.json"

    def run_path(self, key: RunKey) -> Path:
        return self.out / "runs" / f"{key.run_id}.json"

    # ---- worker processes
    def _worker_argv(self, ref: str, role: str, result: Path, extra: list[str]) -> list[str]:
        argv = [self.config.python, "-m", "tally.bench.worker", "--workload", ref, "--role", role,
                "--result", str(result), "--warmup-steps", str(self.config.warmup_steps),
                "--warmup-s", str(self.config.warmup_s), "--start-timeout-s", str(self.config.start_timeout_s)]
        command = self.config.hp_command if role == "hp" else self.config.be_command
        if ref == registry.COMMAND_REF and command:
            argv += ["--command", command]
        for option in (self.config.hp_options if role == "hp" else self.config.be_options):
            argv += ["--option", option]
        return argv + extra

    def _spawn_worker(self, system: systems_mod.System, role: str, argv: list[str], log: Path,
                      ref: str | None = None, stats_dir: Path | None = None,
                      prep_dir: Path | None = None) -> subprocess.Popen:
        """Start a worker under `system`; a system that prepares per workload (tally-block) does so
        first, in `prep_dir` (RunFailed with its one-line reason when that fails)."""
        if ref is not None and system.needs_preparation(role):
            self._prepare_role(system, role, ref, prep_dir or log.parent / f"blocksched__{_slug(ref)}")
        if stats_dir is not None:
            shutil.rmtree(stats_dir, ignore_errors=True)
            stats_dir.mkdir(parents=True)
        try:
            launch = system.launch(role, ref=ref, stats_dir=stats_dir)
        except TallyError as exc:
            raise RunFailed(str(exc)) from None
        env = {k: v for k, v in os.environ.items() if k not in launch.unset}
        env.update(launch.env)
        if role != "hp":
            env.pop(systems_mod.HP_STREAM_PRIORITY_ENV, None)
        return self.processes.spawn(launch.prefix + argv, env, log)

    def _prepare_role(self, system: systems_mod.System, role: str, ref: str, workdir: Path) -> None:
        """The system's preparation of `role` running `ref` (tally-block: capture run + blocksched prepare);
        its commands run as the runner's children (own session, killed as a group on timeout or Ctrl-C)."""

        def execute(argv: list[str], env: dict, log: Path, timeout_s: float) -> int:
            full = dict(os.environ)
            full.update(env)
            if role != "hp":
                full.pop(systems_mod.HP_STREAM_PRIORITY_ENV, None)
            proc = self.processes.spawn([str(a) for a in argv], full, log)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.processes.stop(proc, self.config.stop_grace_s)
                raise TallyError(f"{system.name}: `{_command_name(argv)}` did not finish within {timeout_s:g} s: "
                                 f"{_last_line(log)}") from None
            self.processes.stop(proc, 0)  # reaped; whatever it left in its group goes too
            return proc.returncode

        worker_argv = self._worker_argv(ref, role, workdir / f"capture-{role}.json", [])
        self.say(f"{ref}: preparing for {system.name}")
        try:
            system.prepare_role(role, ref, workdir, worker_argv, execute, self.config.start_timeout_s + 120)
        except TallyError as exc:
            raise RunFailed(str(exc)) from None

    def _wait_ready(self, waiting: dict[str, tuple[subprocess.Popen, Path, Path]], timeout_s: float) -> None:
        """Wait until every worker wrote its ready file; fail fast if one exits."""
        deadline = now() + timeout_s
        pending = dict(waiting)
        while pending:
            for role, (proc, ready, log) in list(pending.items()):
                if ready.exists():
                    del pending[role]
                elif proc.poll() is not None:
                    raise RunFailed(f"{role} worker exited (status {proc.returncode}) before it was ready: "
                                    f"{_last_line(log)}")
            if now() > deadline:
                raise RunFailed(f"{', '.join(pending)} worker(s) not ready within {timeout_s:g} s")
            time.sleep(0.02)

    # ---- baselines
    def capacity(self, hp: str, pool: "WorkerPool | None" = None) -> dict:
        path = self.capacity_path(hp)
        cached = _read_ok(path)
        if cached is not None:
            return cached
        raw = self.out / "raw" / f"capacity__{_slug(hp)}"
        _fresh_dir(raw)
        self.say(f"capacity of {hp}")
        if pool is not None:
            self._pool_ensure(pool, [("hp", hp)])
            handle = pool.get("hp", hp)
            seq = pool.command(handle, {"op": "capacity", "capacity_s": self.config.capacity_s,
                                        "result": str(raw / "hp.json"), **self._rewarm()})
            self._pool_wait(pool, handle, f"done-{seq}.json", self.config.start_timeout_s + self.config.capacity_s + 60)
            result = _read_worker(raw / "hp.json", handle.log)
        else:
            argv = self._worker_argv(hp, "hp", raw / "hp.json",
                                     ["--measure-capacity", "--capacity-s", str(self.config.capacity_s)])
            proc = self._spawn_worker(systems_mod.Standalone(), "hp", argv, raw / "hp.log")
            self._wait_exit(proc, self.config.start_timeout_s + self.config.capacity_s + 60, "hp", raw / "hp.log")
            result = _read_worker(raw / "hp.json", raw / "hp.log")
        out = {"status": "ok", "hp": hp, **result["capacity"], "info": result.get("info", {}),
               "workload": result["workload"]}
        _write(path, out)
        return out

    def arrivals(self, hp: str, load: float, pool: "WorkerPool | None" = None) -> traces.Arrivals:
        path = self.arrivals_path(hp, load)
        if path.exists():
            return traces.Arrivals.read(path)
        service_time = float(self.capacity(hp, pool)["service_time_s"])
        trace = None
        if self.config.arrival_source == "azure":
            if self._trace is None:
                if not self.config.trace_path:
                    raise TallyError("arrival source 'azure' needs --trace FILE")
                self._trace = traces.load_azure_csv(self.config.trace_path)
            trace = self._trace
        arrivals = traces.make_arrivals(
            self.config.arrival_source, load, service_time, self.config.duration_s, seed=self.config.seed,
            trace=trace, trace_function=self.config.trace_function,
            window_start_s=self.config.trace_window[0], window_length_s=self.config.trace_window[1])
        arrivals.write(path)
        return arrivals

    def hp_alone(self, hp: str, load: float, pool: "WorkerPool | None" = None) -> dict:
        path = self.hp_alone_path(hp, load)
        cached = _read_ok(path)
        if cached is not None:
            return cached
        self.arrivals(hp, load, pool)
        raw = self.out / "raw" / f"standalone__hp__{_slug(hp)}__{_load_tag(load)}"
        _fresh_dir(raw)
        self.say(f"{hp} alone at load {load:g}")
        with ExitStack() as stack:
            if pool is not None:
                # the pool's other workers are paused (no GPU work) while HP runs alone
                self._pool_ensure(pool, [("hp", hp)])
                handle = pool.get("hp", hp)
                seq = pool.command(handle, {"op": "serve", "arrivals": str(self.arrivals_path(hp, load)),
                                            "go_file": str(raw / "go"), "result": str(raw / "hp.json"),
                                            "go_timeout_s": self.config.start_timeout_s, **self._rewarm()})
                self._pool_wait(pool, handle, f"ack-{seq}.json", self.config.start_timeout_s)
                sampler = self._sampler(stack)
                (raw / "go").write_text(str(now()))
                self._pool_wait(pool, handle, f"done-{seq}.json", 2 * self.config.duration_s + 60)
                log = handle.log
            else:
                stack.callback(self.processes.stop_all, self.config.stop_grace_s)
                sampler = self._sampler(stack)
                argv = self._worker_argv(hp, "hp", raw / "hp.json", ["--arrivals", str(self.arrivals_path(hp, load))])
                proc = self._spawn_worker(systems_mod.Standalone(), "hp", argv, raw / "hp.log")
                self._wait_exit(proc, self._hp_timeout(), "hp", raw / "hp.log")
                log = raw / "hp.log"
        result = _read_worker(raw / "hp.json", log)
        summary = metrics.hp_summary(result)
        result["status"] = "ok" if summary["completed"] else "failed"
        result["summary"] = summary
        result["gpu_util_percent"] = (metrics.mean_utilization(sampler.samples, tuple(summary["window"]))
                                      if sampler and summary["window"] else math.nan)
        if sampler and summary["window"]:
            result["gpu_state"] = metrics.gpu_state(sampler.samples, tuple(summary["window"]))
        _write(path, result)
        return result

    def be_alone(self, be: str, pool: "WorkerPool | None" = None) -> dict:
        path = self.be_alone_path(be)
        cached = _read_ok(path)
        if cached is not None:
            return cached
        raw = self.out / "raw" / f"standalone__be__{_slug(be)}"
        _fresh_dir(raw)
        self.say(f"{be} alone")
        with ExitStack() as stack:
            if pool is not None:
                self._pool_ensure(pool, [("be", be)])
                handle = pool.get("be", be)
                sampler = self._sampler(stack)
                seq = pool.command(handle, {"op": "train", "stop_file": str(raw / "stop"),
                                            "duration": self.config.duration_s, "result": str(raw / "be.json"),
                                            **self._rewarm()})
                self._pool_wait(pool, handle, f"done-{seq}.json",
                                self.config.start_timeout_s + self.config.duration_s + 60)
                log = handle.log
            else:
                stack.callback(self.processes.stop_all, self.config.stop_grace_s)
                sampler = self._sampler(stack)
                argv = self._worker_argv(be, "be", raw / "be.json", ["--duration", str(self.config.duration_s)])
                proc = self._spawn_worker(systems_mod.Standalone(), "be", argv, raw / "be.log")
                self._wait_exit(proc, self.config.start_timeout_s + self.config.duration_s + 60, "be", raw / "be.log")
                log = raw / "be.log"
        result = _read_worker(raw / "be.json", log)
        rate = metrics.be_rate(result)
        result["status"] = "ok" if rate > 0 else "failed"
        result["steps_per_s"] = rate
        steps = result.get("step_end_times") or []
        window = (result.get("measure_start_time") or 0.0, steps[-1] if steps else 0.0)
        result["gpu_util_percent"] = metrics.mean_utilization(sampler.samples, window) if sampler else math.nan
        if sampler:
            result["gpu_state"] = metrics.gpu_state(sampler.samples, window)
        _write(path, result)
        return result

    def _sampler(self, stack: ExitStack) -> GpuSampler | None:
        if not self.config.sample_gpu:
            return None
        sampler = GpuSampler(self.processes)
        stack.callback(sampler.stop)
        return sampler

    def _hp_timeout(self) -> float:
        # warm-up + the serve loop's own deadline (2 x duration + 10 s) + slack
        return self.config.start_timeout_s + 2 * self.config.duration_s + 60

    def _wait_exit(self, proc: subprocess.Popen, timeout_s: float, role: str, log: Path) -> int:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.processes.stop(proc, self.config.stop_grace_s)
            raise RunFailed(f"{role} worker did not finish within {timeout_s:g} s: {_last_line(log)}") from None

    # ---- one co-located run
    def run(self, key: RunKey, force: bool = False, pool: "WorkerPool | None" = None) -> dict:
        """Run (or load, when already done) one (hp, be, system, load) run; returns its summary."""
        path = self.run_path(key)
        if not force:
            cached = _read_ok(path)
            if cached is None and key.legacy_run_id != key.run_id:
                cached = _read_ok(self.out / "runs" / f"{key.legacy_run_id}.json")
            if cached is not None:
                return cached
        base = {"key": key.__dict__, "run_id": key.run_id, "created": _dt.datetime.now().isoformat(timespec="seconds"),
                "duration_s": self.config.duration_s}
        system = self._make_system(key.system)
        base["system"] = system.describe()
        if key.system == "standalone":
            summary = self._standalone_summary(key, base, pool)
            _write(path, summary)
            return summary
        reason = system.unavailable_reason()
        if reason is not None:
            summary = {**base, "status": "unavailable", "reason": reason}
            _write(path, summary)
            return summary
        try:
            hp_alone = self.hp_alone(key.hp, key.load)
            be_alone = self.be_alone(key.be)
            hp_result, be_result, samples = self._colocated(key, system)
            summary = self._summarize(key, base, hp_result, be_result, hp_alone, be_alone, samples)
            summary["scheduler"] = self.last_scheduler
            if system.agent_stats:
                summary.update(agent_fields(self.last_agent_stats, "process"))
            if isinstance(system, systems_mod.TallyBlock):
                summary["system"] = system.describe()  # with the plan it ran
            summary["timing"] = {**(self.last_timing or {}),
                                 "hp_build_s": hp_result.get("build_s"), "be_build_s": be_result.get("build_s"),
                                 "hp_warmup_s": (hp_result.get("warmup") or {}).get("seconds"),
                                 "be_warmup_s": (be_result.get("warmup") or {}).get("seconds")}
        except (RunFailed, TallyError) as exc:
            summary = {**base, "status": "failed", "reason": str(exc)}
        _write(path, summary)
        return summary

    def _colocated(self, key: RunKey, system: systems_mod.System) -> tuple[dict, dict, list]:
        raw = self.out / "raw" / key.run_id
        _fresh_dir(raw)
        arrivals_path = self.arrivals_path(key.hp, key.load)
        go_file = raw / "go"
        hp_argv = self._worker_argv(key.hp, "hp", raw / "hp.json",
                                    ["--arrivals", str(arrivals_path), "--ready-file", str(raw / "hp.ready"),
                                     "--go-file", str(go_file)])
        be_argv = self._worker_argv(key.be, "be", raw / "be.json", ["--ready-file", str(raw / "be.ready")])
        self.say(f"{key.hp} + {key.be} under {key.system}")
        marks = {"begin": now()}
        self.last_timing = None
        self.last_agent_stats = None
        with ExitStack() as stack:
            # LIFO: processes die before the system (an MPS quit waits for its clients)
            stack.callback(lambda: marks.setdefault("down", now()))
            stack.callback(system.stop)
            system.start()
            marks["system_up"] = now()
            stack.callback(self.processes.stop_all, self.config.stop_grace_s)
            stats_dir = raw / "agent-stats" if system.agent_stats else None
            be = self._spawn_worker(system, "be", be_argv, raw / "be.log", ref=key.be, stats_dir=stats_dir,
                                    prep_dir=raw / "blocksched")
            hp = self._spawn_worker(system, "hp", hp_argv, raw / "hp.log", ref=key.hp, prep_dir=raw / "blocksched-hp")
            self._wait_ready({"be": (be, raw / "be.ready", raw / "be.log"),
                              "hp": (hp, raw / "hp.ready", raw / "hp.log")}, self.config.start_timeout_s)
            sampler = self._sampler(stack)
            self.last_scheduler = None
            counters_before = system.counters()
            marks["go"] = now()
            go_file.write_text(str(marks["go"]))
            # the HP replay ends on its own; BE must outlive it to share the whole window
            rc = self._wait_exit(hp, 2 * self.config.duration_s + 60, "hp", raw / "hp.log")
            marks["hp_exit"] = now()
            if counters_before is not None:
                # the HP worker has exited: only its last counters are gone; BE's are what matter
                self.last_scheduler = metrics.scheduler_delta(counters_before, system.counters(),
                                                              {"hp": hp.pid, "be": be.pid})
            if be.poll() is not None:
                raise RunFailed(f"be worker exited (status {be.returncode}) during the run: {_last_line(raw / 'be.log')}")
            self.processes.stop(be, self.config.stop_grace_s)
            samples = list(sampler.samples) if sampler else []
            if stats_dir is not None:
                # the agent wrote it at the BE process's exit (tally run execs: the worker's pid)
                self.last_agent_stats = read_agent_stats(stats_dir, be.pid)
        self.last_timing = run_timing(marks, _ready_time(raw / "hp.ready"), _ready_time(raw / "be.ready"))
        if rc != 0:
            raise RunFailed(f"hp worker failed (status {rc}): {_last_line(raw / 'hp.log')}")
        return _read_worker(raw / "hp.json", raw / "hp.log"), _read_worker(raw / "be.json", raw / "be.log"), samples

    def _summarize(self, key: RunKey, base: dict, hp_result: dict, be_result: dict, hp_alone: dict,
                   be_alone: dict, samples: list) -> dict:
        hp = metrics.hp_summary(hp_result)
        if not hp["completed"]:
            raise RunFailed("the HP worker completed no request")
        window = tuple(hp["window"])
        be_rate = metrics.be_rate(be_result, window)
        alone = hp_alone["summary"]
        hp_norm = metrics.normalized(hp["throughput_rps"], alone["throughput_rps"])
        be_norm = metrics.normalized(be_rate, be_alone["steps_per_s"])
        e2e, service = metrics.hp_request_latencies(hp_result["requests"])
        return {
            **base,
            "status": "ok",
            "hp": {**hp, "latencies_ms": [round(x * 1e3, 4) for x in e2e],
                   "service_ms": [round(x * 1e3, 4) for x in service]},
            "hp_alone": {"latency": alone["latency"], "service": alone["service"],
                         "throughput_rps": alone["throughput_rps"],
                         "gpu_util_percent": hp_alone.get("gpu_util_percent")},
            "be": {"steps_per_s": be_rate, "alone_steps_per_s": be_alone["steps_per_s"],
                   "steps_total": len(be_result.get("step_end_times", []))},
            "p99_overhead": metrics.overhead(hp["latency"]["p99_ms"], alone["latency"]["p99_ms"]),
            "service_p99_overhead": metrics.overhead(hp["service"]["p99_ms"], alone["service"]["p99_ms"]),
            "hp_normalized": hp_norm,
            "be_normalized": be_norm,
            "system_throughput": metrics.system_throughput(hp_norm, be_norm),
            "gpu_util_percent": metrics.mean_utilization(samples, window),
            "gpu_state": metrics.gpu_state(samples, window),
            "workloads": {"hp": hp_result["workload"], "be": be_result["workload"]},
            "info": {"hp": hp_result.get("info", {}), "be": be_result.get("info", {})},
            "trace": hp_result.get("arrivals", {}),
            "gc": {"hp": hp_result.get("gc"), "be": be_result.get("gc")},
        }

    def _standalone_summary(self, key: RunKey, base: dict, pool: "WorkerPool | None" = None) -> dict:
        try:
            hp_alone = self.hp_alone(key.hp, key.load, pool)
            be_alone = self.be_alone(key.be, pool)
        except (RunFailed, TallyError) as exc:
            return {**base, "status": "failed", "reason": str(exc)}
        e2e, service = metrics.hp_request_latencies(hp_alone["requests"])
        summary = hp_alone["summary"]
        return {
            **base, "status": "ok",
            "hp": {**summary, "latencies_ms": [round(x * 1e3, 4) for x in e2e],
                   "service_ms": [round(x * 1e3, 4) for x in service]},
            "hp_alone": {"latency": summary["latency"], "service": summary["service"],
                         "throughput_rps": summary["throughput_rps"]},
            "be": {"steps_per_s": be_alone["steps_per_s"], "alone_steps_per_s": be_alone["steps_per_s"],
                   "steps_total": len(be_alone.get("step_end_times", []))},
            "p99_overhead": 0.0, "service_p99_overhead": 0.0,
            # alone, each job has all of the GPU: HP and BE are 1.0 each, but never together
            "hp_normalized": 1.0, "be_normalized": 1.0, "system_throughput": math.nan,
            "gpu_util_percent": hp_alone.get("gpu_util_percent", math.nan),
            "be_gpu_util_percent": be_alone.get("gpu_util_percent", math.nan),
            "gpu_state": hp_alone.get("gpu_state"), "be_gpu_state": be_alone.get("gpu_state"),
            "workloads": {"hp": hp_alone["workload"], "be": be_alone["workload"]},
            "info": {"hp": hp_alone.get("info", {}), "be": be_alone.get("info", {})},
            "trace": hp_alone.get("arrivals", {}),
            "gc": {"hp": hp_alone.get("gc"), "be": be_alone.get("gc")},
            "scheduler": None,
        }

    # ---- a matrix of runs
    def overheads(self) -> "Overheads":
        """Per-run overheads for the estimate: measured ones from this output dir's earlier runs
        where there are any, else the defaults measured on an H100 (see Overheads)."""
        return Overheads.measured(self.out / "runs", self.config)

    def plan_seconds(self, keys: list[RunKey], overheads: "Overheads | None" = None) -> float:
        """Wall time of `keys` from scratch (for the ETA and the printed estimate), from per-run
        overheads: worker startup (interpreter, torch import, model build, warm-up; HP and BE in
        parallel), system start/stop, and the measurement's tail."""
        c = self.config
        o = overheads or self.overheads()
        if self.reuse_possible(keys):
            return self._plan_reused(keys, o)
        hps = {k.hp for k in keys}
        hp_loads = {(k.hp, k.load) for k in keys}
        bes = {k.be for k in keys}
        colocated = [k for k in keys if k.system not in ("standalone",)
                     and self._make_system(k.system).unavailable_reason() is None]
        total = sum(o.startup(hp) + c.capacity_s + o.teardown_s for hp in hps)
        total += sum(o.startup(hp) + c.duration_s + o.tail_s + o.teardown_s for hp, _ in hp_loads)
        total += sum(o.startup(be) + c.duration_s + o.teardown_s for be in bes)
        total += sum(o.system_s(k.system) + max(o.startup(k.hp), o.startup(k.be)) + c.duration_s + o.tail_s
                     + o.teardown_s for k in colocated)
        total += sum(o.startup(k.be) + 1.0 + o.prepare_s for k in colocated
                     if self._make_system(k.system).needs_preparation("be"))
        return total

    def _plan_reused(self, keys: list[RunKey], o: "Overheads") -> float:
        """The reuse schedule (schedule(), WorkerPool's LRU with `cap` per role) simulated with the
        per-run overheads: worker startups (parallel at a group's start: the slowest + parallel_start_s
        per extra one; later ones one at a time), windows, system start and teardown per group."""
        c = self.config
        _, groups = self.schedule(keys, skip_done=False)
        total = 0.0
        for group in groups:
            if group.system != "standalone":
                total += o.system_s(group.system)
                if self._make_system(group.system).needs_preparation("be"):
                    total += sum(o.startup(be) + 1.0 + o.prepare_s for be in dict.fromkeys(k.be for k in group.keys))
            live: list[tuple[str, str]] = []

            def need(wanted: list[tuple[str, str]]) -> float:
                new = [w for w in dict.fromkeys(wanted) if w not in live]
                for role in {w[0] for w in new}:
                    count = sum(1 for w in new if w[0] == role)
                    idle = [w for w in live if w[0] == role and w not in wanted]
                    while idle and sum(1 for w in live if w[0] == role) + count > group.cap:
                        live.remove(idle.pop(0))
                for w in wanted:
                    if w in live:
                        live.remove(w)
                    live.append(w)
                if not new:
                    return 0.0
                return max(o.startup(w[1]) for w in new) + o.parallel_start_s * (len(new) - 1)

            first = [("be", b[1]) if b[0] == "be_alone" else ("hp", b[1]) for b in group.baselines]
            for key in group.keys:
                if key.system != "standalone":
                    first += [("hp", key.hp), ("be", key.be)]
            first = list(dict.fromkeys(first))
            total += need([w for w in first if w[0] == "hp"][:group.cap] + [w for w in first if w[0] == "be"][:group.cap])
            for item in group.baselines:
                if item[0] == "capacity":
                    total += need([("hp", item[1])]) + o.window_gap_s + c.capacity_s
                elif item[0] == "hp_alone":
                    total += need([("hp", item[1])]) + o.window_gap_s + c.duration_s + o.tail_s
                else:
                    total += need([("be", item[1])]) + o.window_gap_s + c.duration_s
            for key in group.keys:
                if key.system != "standalone":
                    total += need([("hp", key.hp), ("be", key.be)]) + o.window_gap_s + c.duration_s + o.tail_s
            total += o.teardown_s
        return total

    def run_matrix(self, keys: list[RunKey], on_done: Callable[[RunKey, dict, float], None] | None = None) -> list[dict]:
        results = []
        with sigterm_as_interrupt():
            try:
                self.write_environment()
                if self.reuse_possible(keys):
                    return self._run_matrix_reused(keys, on_done)
                for key in keys:
                    t0 = now()
                    summary = self.run(key)
                    results.append(summary)
                    if on_done:
                        on_done(key, summary, now() - t0)
            finally:
                self.processes.stop_all(self.config.stop_grace_s)
        return results

    # ---- reused workers (see docs/bench.md, "How runs are scheduled")
    def reuse_possible(self, keys: list[RunKey]) -> bool:
        """Workers are reused unless disabled or a workload is a user command (a command BE trains
        on its own: it cannot be paused between windows)."""
        return self.config.reuse_workers and not any(
            registry.COMMAND_REF in (k.hp, k.be) for k in keys)

    def _rewarm(self) -> dict:
        return {"warmup_steps": self.config.rewarm_steps, "warmup_s": self.config.rewarm_s}

    def _session_argv(self, ref: str, role: str, control: Path) -> list[str]:
        argv = [self.config.python, "-m", "tally.bench.worker", "--workload", ref, "--role", role,
                "--control", str(control), "--warmup-steps", str(self.config.warmup_steps),
                "--warmup-s", str(self.config.warmup_s), "--start-timeout-s", str(self.config.start_timeout_s),
                "--idle-timeout-s", str(max(1800.0, 2 * self.config.start_timeout_s))]
        for option in (self.config.hp_options if role == "hp" else self.config.be_options):
            argv += ["--option", option]
        return argv

    def _open_pool(self, group: "Group", system: systems_mod.System) -> WorkerPool:
        def spawn(role: str, ref: str, control: Path, log: Path) -> subprocess.Popen:
            self.worker_starts.append((group.label, role, ref))
            stats_dir = control.with_name(control.name + ".agent-stats") if role == "be" and system.agent_stats else None
            proc = self._spawn_worker(system, role, self._session_argv(ref, role, control), log, ref=ref,
                                      stats_dir=stats_dir,
                                      prep_dir=control.parent / f"blocksched__{role}__{_slug(ref)}")
            if stats_dir is not None:
                self._worker_stats_dirs[proc.pid] = stats_dir
            return proc

        return WorkerPool(spawn, self.processes.stop, self.out / "raw" / "workers" / system_slug(group.label),
                          group.cap, self.config.start_timeout_s, self.config.stop_grace_s, _last_line)

    def _pool_ensure(self, pool: WorkerPool, wanted: list[tuple[str, str]]) -> dict:
        try:
            return pool.ensure(wanted)
        except WorkerFailed as exc:
            raise RunFailed(str(exc)) from None

    def _pool_wait(self, pool: WorkerPool, handle, name: str, timeout_s: float) -> dict:
        try:
            answer = pool.wait(handle, name, timeout_s)
        except WorkerFailed as exc:
            raise RunFailed(str(exc)) from None
        if name.startswith("done-") and not answer.get("ok", True):
            # a workload that raised may have left its process in a bad state: never reuse it
            pool.retire(handle, polite=True)
        return answer

    def schedule(self, keys: list[RunKey], skip_done: bool = True) -> tuple[list[RunKey], list["Group"]]:
        """Split `keys` into runs that need no worker (done, unavailable) and launch groups: the
        plain group (baselines, standalone and time-slicing: workers without a system around them)
        first, then one group per other system, each with its runs ordered so that consecutive runs
        share workers (HP-major, BE order alternating)."""
        immediate: list[RunKey] = []
        todo: list[RunKey] = []
        for key in keys:
            done = skip_done and (_read_ok(self.run_path(key)) is not None
                                  or _read_ok(self.out / "runs" / f"{key.legacy_run_id}.json") is not None)
            system = self._make_system(key.system)
            if done or system.unavailable_reason() is not None:
                immediate.append(key)
            else:
                todo.append(key)
        groups: dict[str, Group] = {}
        plain = Group("standalone", "standalone", [], max(1, self.config.reuse_cap))
        for key in todo:
            if key.system in PLAIN_SYSTEMS:
                plain.keys.append(key)
                continue
            if key.system not in groups:
                system = self._make_system(key.system)
                cap = 1 if isinstance(system, systems_mod.Tally) else max(1, self.config.reuse_cap)
                groups[key.system] = Group(key.system, key.system, [], cap)
            groups[key.system].keys.append(key)
        for hp in dict.fromkeys(k.hp for k in todo):
            if not skip_done or _read_ok(self.capacity_path(hp)) is None:
                plain.baselines.append(("capacity", hp))
        for hp, load in dict.fromkeys((k.hp, k.load) for k in todo):
            if not skip_done or _read_ok(self.hp_alone_path(hp, load)) is None:
                plain.baselines.append(("hp_alone", hp, load))
        for be in dict.fromkeys(k.be for k in todo):
            if not skip_done or _read_ok(self.be_alone_path(be)) is None:
                plain.baselines.append(("be_alone", be))
        for group in [plain, *groups.values()]:
            group.keys = _serpentine(group.keys)
        out = ([plain] if plain.keys or plain.baselines else []) + list(groups.values())
        return immediate, out

    def _run_matrix_reused(self, keys: list[RunKey], on_done) -> list[dict]:
        by_key: dict[RunKey, dict] = {}

        def finish(key: RunKey, summary: dict, t0: float) -> None:
            by_key[key] = summary
            if on_done:
                on_done(key, summary, now() - t0)

        immediate, groups = self.schedule(keys)
        for key in immediate:
            t0 = now()
            finish(key, self.run(key), t0)
        for group in groups:
            self._run_group(group, finish)
        return [by_key[key] for key in keys]

    def _run_group(self, group: "Group", finish: Callable[[RunKey, dict, float], None]) -> None:
        system = self._make_system(group.system)
        t0 = now()
        try:
            system.start()
        except (TallyError, OSError) as exc:
            system.stop()
            for key in group.keys:
                summary = self._failed(key, system, f"{group.system} did not start: {exc}")
                finish(key, summary, t0)
            return
        system_start_s: float | None = now() - t0
        pool = self._open_pool(group, system)
        try:
            # the group's first workers build and warm up in parallel (nothing is measured meanwhile)
            first: list[tuple[str, str]] = []
            for item in group.baselines:
                first.append(("be", item[1]) if item[0] == "be_alone" else ("hp", item[1]))
            for key in group.keys:
                if key.system != "standalone":
                    first += [("hp", key.hp), ("be", key.be)]
            first = list(dict.fromkeys(first))
            prefetch = [w for w in first if w[0] == "hp"][:group.cap] + [w for w in first if w[0] == "be"][:group.cap]
            try:
                self._pool_ensure(pool, prefetch)
            except RunFailed:
                pass  # each run that needs the failed worker retries it and records why
            for item in group.baselines:
                try:
                    if item[0] == "capacity":
                        self.capacity(item[1], pool)
                    elif item[0] == "hp_alone":
                        self.hp_alone(item[1], item[2], pool)
                    else:
                        self.be_alone(item[1], pool)
                except (RunFailed, TallyError) as exc:
                    self._baseline_failures["/".join(map(str, item[1:]))] = str(exc)
            for key in group.keys:
                t1 = now()
                if key.system == "standalone":
                    summary = self.run(key, pool=pool)
                else:
                    summary = self.run_reused(key, system, pool, system_start_s)
                    system_start_s = None
                finish(key, summary, t1)
            pool.close()
            self._attach_worker_stats()
        except BaseException:
            self.processes.stop_all(self.config.stop_grace_s)  # the clients die before their system
            raise
        finally:
            system.stop()

    def _attach_worker_stats(self) -> None:
        """Runs of reused BE workers get their agent's stats (written at the worker's exit, so they
        cover its whole life: every window it ran, with their re-warm-ups)."""
        pending, self._stats_pending = self._stats_pending, []
        for run_path, handle in pending:
            if handle is None or handle.alive():
                continue
            stats_dir = self._worker_stats_dirs.get(handle.proc.pid)
            stats = read_agent_stats(stats_dir, handle.proc.pid) if stats_dir is not None else None
            if stats is None:
                continue
            try:
                run = json.loads(run_path.read_text())
            except (OSError, ValueError):
                continue
            if run.get("status") != "ok":
                continue
            run.update(agent_fields(stats, "worker", handle.windows))
            _write(run_path, run)

    def _failed(self, key: RunKey, system: systems_mod.System, reason: str) -> dict:
        summary = {"key": key.__dict__, "run_id": key.run_id,
                   "created": _dt.datetime.now().isoformat(timespec="seconds"),
                   "duration_s": self.config.duration_s, "system": system.describe(),
                   "status": "failed", "reason": reason}
        _write(self.run_path(key), summary)
        return summary

    def run_reused(self, key: RunKey, system: systems_mod.System, pool: WorkerPool,
                   system_start_s: float | None = None) -> dict:
        """One co-located run as a measurement window of the pool's (reused) workers; the same
        summary as run(), plus `worker_reused` and a `timing` of the window."""
        base = {"key": key.__dict__, "run_id": key.run_id, "created": _dt.datetime.now().isoformat(timespec="seconds"),
                "duration_s": self.config.duration_s, "system": system.describe()}
        try:
            hp_alone = _read_ok(self.hp_alone_path(key.hp, key.load))
            be_alone = _read_ok(self.be_alone_path(key.be))
            for name, value, ident in (("HP alone", hp_alone, f"{key.hp}/{key.load}"), ("BE alone", be_alone, key.be)):
                if value is None:
                    why = self._baseline_failures.get(ident) or self._baseline_failures.get(key.hp) or "not measured"
                    raise RunFailed(f"baseline {name} ({ident}) failed: {why}")
            hp_result, be_result, samples, timing, started = self._window(key, pool, system)
            summary = self._summarize(key, base, hp_result, be_result, hp_alone, be_alone, samples)
            summary["scheduler"] = self.last_scheduler
            if system_start_s is not None:
                timing = {"system_start_s": round(system_start_s, 3), **timing}
            summary["timing"] = {**timing,
                                 "hp_build_s": hp_result.get("build_s"), "be_build_s": be_result.get("build_s"),
                                 "hp_warmup_s": (hp_result.get("warmup") or {}).get("seconds"),
                                 "be_warmup_s": (be_result.get("warmup") or {}).get("seconds")}
            summary["worker_reused"] = {"hp": not started[("hp", key.hp)], "be": not started[("be", key.be)]}
            summary["workers"] = {"hp": hp_result.get("session"), "be": be_result.get("session")}
            if system.agent_stats:
                # the agent writes its stats when the BE worker exits (end of the group, or eviction):
                # _attach_worker_stats fills these in then
                summary.update(agent_fields(None, "worker"))
                self._stats_pending.append((self.run_path(key), self.last_be_handle))
            if isinstance(system, systems_mod.TallyBlock):
                summary["system"] = system.describe()  # with the plan it ran
        except (RunFailed, TallyError) as exc:
            summary = {**base, "status": "failed", "reason": str(exc)}
        _write(self.run_path(key), summary)
        return summary

    def _window(self, key: RunKey, pool: WorkerPool, system: systems_mod.System | None = None):
        raw = self.out / "raw" / key.run_id
        _fresh_dir(raw)
        self.say(f"{key.hp} + {key.be} under {key.system}")
        marks = {"begin": now()}
        started = self._pool_ensure(pool, [("hp", key.hp), ("be", key.be)])
        hp, be = pool.get("hp", key.hp), pool.get("be", key.be)
        self.last_be_handle = be
        _write(raw / "workers.json", {"hp": {"pid": hp.proc.pid, "log": str(hp.log)},
                                      "be": {"pid": be.proc.pid, "log": str(be.log)}})
        go_file, stop_file = raw / "go", raw / "be.stop"
        c = self.config
        be_seq = pool.command(be, {"op": "train", "stop_file": str(stop_file), "duration": None,
                                   "result": str(raw / "be.json"), **self._rewarm()})
        hp_seq = pool.command(hp, {"op": "serve", "arrivals": str(self.arrivals_path(key.hp, key.load)),
                                   "go_file": str(go_file), "result": str(raw / "hp.json"),
                                   "go_timeout_s": c.start_timeout_s, **self._rewarm()})
        with ExitStack() as stack:
            try:
                self._pool_wait(pool, hp, f"ack-{hp_seq}.json", c.start_timeout_s)
                self._pool_wait(pool, be, f"ack-{be_seq}.json", c.start_timeout_s)
                sampler = self._sampler(stack)
                self.last_scheduler = None
                counters_before = system.counters() if system is not None else None
                marks["go"] = now()
                go_file.write_text(str(marks["go"]))
                self._pool_wait(pool, hp, f"done-{hp_seq}.json", 2 * c.duration_s + 60)
                marks["hp_exit"] = now()
                if counters_before is not None:
                    self.last_scheduler = metrics.scheduler_delta(
                        counters_before, system.counters(), {"hp": hp.proc.pid, "be": be.proc.pid})
                if not be.alive():
                    pool.retire(be)
                    raise RunFailed(f"be worker ({key.be}) died (status {be.proc.returncode}) during the run: "
                                    f"{_last_line(be.log)}")
                stop_file.touch()
                self._pool_wait(pool, be, f"done-{be_seq}.json", c.stop_grace_s + 60)
                marks["down"] = now()
                samples = list(sampler.samples) if sampler else []
            except (RunFailed, TallyError):
                # leave no worker mid-command: BE is told to stop; what does not finish is stopped
                stop_file.touch()
                for handle, seq in ((be, be_seq), (hp, hp_seq)):
                    if handle.alive() and not (handle.control / f"done-{seq}.json").exists():
                        if handle is be:
                            try:
                                pool.wait(handle, f"done-{seq}.json", min(c.stop_grace_s, 5.0))
                                continue
                            except WorkerFailed:
                                continue  # retired by wait
                        pool.retire(handle)
                raise
        hp_result = _read_worker(raw / "hp.json", hp.log)
        be_result = _read_worker(raw / "be.json", be.log)
        timing: dict = {}
        started = {("hp", hp.ref): hp.windows == 1, ("be", be.ref): be.windows == 1}  # first command: not reused
        for role, handle in (("hp", hp), ("be", be)):
            if handle.ready_time is not None:
                timing[f"{role}_worker_startup_s"] = handle.ready_time - handle.spawned  # build + warm-up, once
                if started[(role, handle.ref)]:
                    timing[f"{role}_startup_s"] = timing[f"{role}_worker_startup_s"]
        timing.update(startup_s=marks["go"] - marks["begin"], measure_s=marks["hp_exit"] - marks["go"],
                      teardown_s=marks["down"] - marks["hp_exit"], total_s=marks["down"] - marks["begin"])
        timing = {k: round(v, 3) for k, v in timing.items()}
        self.last_timing = timing
        return hp_result, be_result, samples, timing, started

    def write_environment(self) -> dict:
        path = self.out / "environment.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        env = collect_environment()
        _write(path, env)
        return env


# ---------------------------------------------------------------- scheduling with reused workers

# systems whose workers get no environment or prefix: the baselines' workers serve them too
PLAIN_SYSTEMS = ("standalone", "time-slicing")


@dataclass
class Group:
    """The runs of one launch group: the workers of all of them are started under one system."""

    label: str
    system: str
    keys: list[RunKey]
    cap: int
    baselines: list[tuple] = field(default_factory=list)  # ("capacity", hp) | ("hp_alone", hp, load) | ("be_alone", be)


def _serpentine(keys: list[RunKey]) -> list[RunKey]:
    """Order runs so that consecutive ones share a worker: HP-major (first appearance), the BE order
    reversed for every other HP, loads of a pair together; standalone runs (no workers) last."""
    standalone = [k for k in keys if k.system == "standalone"]
    rest = [k for k in keys if k.system != "standalone"]
    hps = list(dict.fromkeys(k.hp for k in rest))
    bes = list(dict.fromkeys(k.be for k in rest))
    out: list[RunKey] = []
    for i, hp in enumerate(hps):
        for be in (bes if i % 2 == 0 else bes[::-1]):
            out += [k for k in rest if k.hp == hp and k.be == be]
    return out + standalone


# ---------------------------------------------------------------- timing


def _ready_time(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_timing(marks: dict, hp_ready: float | None, be_ready: float | None) -> dict:
    """Where a co-located run's wall time went (seconds), from the runner's marks and the
    workers' ready times (all CLOCK_MONOTONIC)."""
    begin, up = marks["begin"], marks.get("system_up")
    out: dict = {}
    if up is not None:
        out["system_start_s"] = up - begin
        if hp_ready is not None:
            out["hp_startup_s"] = hp_ready - up
        if be_ready is not None:
            out["be_startup_s"] = be_ready - up
        if "go" in marks:
            out["startup_s"] = marks["go"] - up
    if "go" in marks and "hp_exit" in marks:
        out["measure_s"] = marks["hp_exit"] - marks["go"]
    if "hp_exit" in marks and "down" in marks:
        out["teardown_s"] = marks["down"] - marks["hp_exit"]
    if "down" in marks:
        out["total_s"] = marks["down"] - begin
    return {k: round(v, 3) for k, v in out.items()}


# Worker startup (python + torch import + model build + warm-up, seconds), measured on one H100
# (benchmarks/results/bench-quick-2026-11-25: build_s and warm-up of every run, warm-up 1 s / 5
# steps) plus ~1 s of interpreter start; replaced by this output dir's own measurements when it has any.
DEFAULT_STARTUP_S = {
    "bert-infer": 6.5, "llama-decode": 10.5, "resnet50-train": 16.0, "gpt2-train": 13.0,
}
DEFAULT_SYSTEM_START_S = {"time-slicing": 0.1, "mps": 1.2, "mps-priority": 1.2, "mps-split": 1.2,
                          "tally": 2.2, "tgs": 2.2, "tally-block": 2.2}


@dataclass
class Overheads:
    startup_s: dict[str, float] = field(default_factory=dict)     # per workload ref
    system_start_s: dict[str, float] = field(default_factory=dict)  # per system name
    default_startup_s: float = 15.0
    tail_s: float = 0.7       # the HP replay's end after the last arrival, and result writing
    teardown_s: float = 1.0   # stopping BE (SIGTERM, result, CUDA teardown) and the system
    # reused workers: a window's overhead besides duration + tail: commands, re-warm-up (>= 1 step and
    # 0.25 s, both roles in parallel), BE stop at the next step boundary
    window_gap_s: float = 0.6
    parallel_start_s: float = 1.0  # each extra worker building at the same time (CPU/GPU contention)
    # tally-block, per BE workload and group: the capture run (a worker startup + ~1 s of steps) and
    # `tally blocksched prepare` (a guess; it depends on how many kernels the program loads)
    prepare_s: float = 30.0
    source: str = "defaults"

    def startup(self, ref: str) -> float:
        return self.startup_s.get(ref, self.default_startup_s)

    def system_s(self, name: str) -> float:
        if name in self.system_start_s:
            return self.system_start_s[name]
        base = name.partition("[")[0]
        return self.system_start_s.get(base, 1.0)

    @classmethod
    def measured(cls, runs_dir: Path, config: "BenchConfig") -> "Overheads":
        fake = {"fake-infer", "fake-train"}
        o = cls(startup_s={k: v for k, v in DEFAULT_STARTUP_S.items()},
                system_start_s=dict(DEFAULT_SYSTEM_START_S),
                default_startup_s=config.startup_estimate_s + config.warmup_s)
        for name in fake:
            o.startup_s[name] = config.startup_estimate_s + config.warmup_s
        samples: dict[str, list[float]] = {}
        systems: dict[str, list[float]] = {}
        teardowns: list[float] = []
        gaps: list[float] = []
        for path in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
            try:
                run = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            timing, key = run.get("timing"), run.get("key")
            if run.get("status") != "ok" or not isinstance(timing, dict) or not isinstance(key, dict):
                continue
            for role in ("hp", "be"):
                value = timing.get(f"{role}_worker_startup_s", timing.get(f"{role}_startup_s"))
                if value is not None:
                    samples.setdefault(key[role], []).append(float(value))
            if (run.get("worker_reused") or {}).get("hp") and (run.get("worker_reused") or {}).get("be"):
                if timing.get("startup_s") is not None and timing.get("teardown_s") is not None:
                    gaps.append(float(timing["startup_s"]) + float(timing["teardown_s"]))
            if timing.get("system_start_s") is not None:
                systems.setdefault(key["system"], []).append(float(timing["system_start_s"]))
            if timing.get("teardown_s") is not None and not run.get("worker_reused"):
                teardowns.append(float(timing["teardown_s"]))
        for ref, values in samples.items():
            o.startup_s[ref] = _median(values)
        for name, values in systems.items():
            o.system_start_s[name] = _median(values)
        if teardowns:
            o.teardown_s = _median(teardowns)
        if gaps:
            o.window_gap_s = _median(gaps)
        if samples:
            o.source = f"measured in {runs_dir}"
        return o


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ---------------------------------------------------------------- helpers


def collect_environment() -> dict:
    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "python": platform.python_version(), "platform": platform.platform()}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15).stdout.strip().splitlines()
            if out:
                name, driver, memory = (x.strip() for x in out[0].split(",")[:3])
                env.update(gpu=name, driver=driver, gpu_memory=memory, gpu_count=len(out))
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    return env


def read_agent_stats(stats_dir: Path, pid: int) -> dict | None:
    """The agent's stats file of process `pid` (written at its exit), or None."""
    try:
        data = json.loads((Path(stats_dir) / f"stats-{pid}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def agent_fields(stats: dict | None, scope: str, windows: int | None = None) -> dict:
    """A run's `agent_stats` (the BE agent's stats file) and `blocksched` (its block-level counters,
    metrics.blocksched_summary) entries; scope "process": the one-shot BE process of this run,
    "worker": a reused BE worker's whole life (`windows` windows)."""
    where = {"scope": scope, **({"windows": windows} if windows is not None else {})}
    blocksched = metrics.blocksched_summary(stats)
    return {"agent_stats": {"be": stats, **where} if stats is not None else None,
            "blocksched": {**blocksched, **where} if blocksched is not None else None}


def _command_name(argv: list) -> str:
    words = [str(a) for a in argv]
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "tally":
        words = ["tally"] + words[words.index("-m") + 2:]
    return " ".join(words[:3])


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _write(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=_json_default))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _read_ok(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("status") == "ok" else None


def _read_worker(path: Path, log: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunFailed(f"worker wrote no result ({path.name}): {_last_line(log)}") from None
    if data.get("error"):
        raise RunFailed(f"{data.get('role', 'worker')} worker: {data['error']}")
    return data


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:400] if lines else "empty log"


def run_pair(hp: str, be: str, system: str, load: float, duration: float, out_dir: str | Path,
             force: bool = False, **config) -> dict:
    """Run one co-located pair (or return the stored result) and its baselines; returns the run summary.

    `config` takes any BenchConfig field (e.g. arrival_source="poisson", seed=1).
    """
    runner = Runner(BenchConfig(out_dir=Path(out_dir), duration_s=duration, **config))
    with sigterm_as_interrupt():
        try:
            runner.write_environment()
            return runner.run(RunKey(hp, be, system, load), force=force)
        finally:
            runner.processes.stop_all(runner.config.stop_grace_s)
