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
  tally-block    tally with block-level scheduling: before its BE worker starts,
                 the BE workload runs briefly under `tally run --save-modules`
                 (capture), `tally blocksched prepare --modes slice --plan`
                 transforms the kernels it loaded, and the BE worker runs under
                 `tally run --priority best-effort --block-level --plan PLAN`
                 (TallyBlock.prepare_role, called by the runner)

Tally systems give the BE worker `tally run --stats-dir DIR`: the agent writes
DIR/stats-<pid>.json when the process exits (launch counts and, with block-level
scheduling, its "blocksched" counters; see tally.bench.metrics.blocksched_summary).
"""
from __future__ import annotations

import functools
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
    unset: tuple[str, ...] = ()  # variables of the runner's environment the worker must not get


# execute(argv, env, log, timeout_s) -> exit status: runs one preparation command (the runner's: in
# its own session, killed as a group on timeout or Ctrl-C, env on top of the runner's, output to log);
# raises TallyError when it does not finish within timeout_s
Execute = Callable[[list, dict, Path, float], int]


class System:
    name = ""
    description = ""
    agent_stats = False  # the BE worker gets an agent stats dir (tally run --stats-dir)

    def unavailable_reason(self) -> str | None:
        """None when the system can run; else why not (reported in outputs as 'not run')."""
        return None

    def start(self) -> None:
        """Bring the environment up (daemons). Must be undone by stop() even if it fails halfway."""

    def stop(self) -> None:
        """Tear everything down; safe to call more than once and after a failed start."""

    def launch(self, role: str, ref: str | None = None, stats_dir: Path | None = None) -> RoleLaunch:
        """What a worker of `role` running workload `ref` gets; `stats_dir`: where its agent writes
        stats-<pid>.json (systems with agent_stats)."""
        return RoleLaunch()

    def needs_preparation(self, role: str) -> bool:
        """Whether a worker of `role` needs prepare_role() before launch() (per workload)."""
        return False

    def prepare_role(self, role: str, ref: str, workdir: Path, worker_argv: list[str], execute: Execute,
                     capture_timeout_s: float) -> None:
        """Prepare what launch(role, ref) needs (after start()); TallyError with a one-line reason."""

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

    def launch(self, role: str, ref: str | None = None, stats_dir: Path | None = None) -> RoleLaunch:
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
    description = "tally daemon + agent (GPU-side gate unless gpu-gate=0: launch-level gate)"
    agent_stats = True

    def __init__(self, tally_command: list[str] | None = None, timeout_s: float = 120.0,
                 up_args: list[str] | None = None, name: str | None = None, agent_env: dict | None = None,
                 hp_env: dict | None = None):
        # `python -m tally` rather than a `tally` on PATH: the same installation as this process
        self.tally_command = tally_command or [sys.executable, "-m", "tally"]
        self.up_args = list(up_args or [])
        self.agent_env = dict(agent_env or {})  # agent variables of the BE client (AGENT_TUNABLES)
        self.hp_env = dict(hp_env or {})  # the HP program's own settings (HP_TUNABLES)
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

    def launch(self, role: str, ref: str | None = None, stats_dir: Path | None = None) -> RoleLaunch:
        assert self._runtime_dir is not None, "start() first"
        priority = "high" if role == "hp" else "best-effort"
        env = {"TALLY_RUNTIME_DIR": str(self._runtime_dir), **(self.agent_env if role == "be" else self.hp_env)}
        return RoleLaunch(env=env,
                          prefix=self.tally_command + ["run", "--priority", priority] + _stats_args(stats_dir) + ["--"])


def _stats_args(stats_dir: Path | None) -> list[str]:
    return ["--stats-dir", str(stats_dir)] if stats_dir is not None else []


def block_level_missing() -> str | None:
    """Why this installation of tally cannot run tally-block (None when it can): the system needs
    `tally run --block-level --plan` and `tally blocksched prepare --modes --plan`."""
    try:
        from tally.blocksched.cli import blocksched_group
        from tally.launcher import run_command
    except ImportError as exc:
        return f"unavailable: needs block-level scheduling, which cannot be imported: {exc}"

    def options(command) -> set[str]:
        return {opt for param in getattr(command, "params", []) for opt in getattr(param, "opts", [])}

    missing = []
    if not {"--block-level", "--plan"} <= options(run_command):
        missing.append("`tally run --block-level --plan`")
    if not {"--modes", "--plan"} <= options(blocksched_group.commands.get("prepare")):
        missing.append("`tally blocksched prepare --modes --plan`")
    if missing:
        return f"unavailable: needs block-level scheduling in the CLI (this tally has no {' or '.join(missing)})"
    return None


@functools.lru_cache(maxsize=1)
def gpu_arch() -> str:
    """sm_XY of GPU 0: from the CUDA driver (device 0 of CUDA_VISIBLE_DEVICES), else nvidia-smi's compute_cap."""
    try:
        from tally.bench.micro import device_arch

        return device_arch(0)
    except (TallyError, OSError, AttributeError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=30)
            major, _, minor = out.stdout.strip().splitlines()[0].strip().partition(".")
            if out.returncode == 0 and major.isdigit() and minor.isdigit():
                return f"sm_{major}{minor}"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    raise TallyError("tally-block: cannot tell GPU 0's architecture (the CUDA driver did not answer and nvidia-smi "
                     "has no compute_cap)")


def _worker_error(worker_argv: list[str]) -> str | None:
    """The error a bench worker wrote to its --result file, if it did."""
    try:
        result = Path(worker_argv[worker_argv.index("--result") + 1])
        error = json.loads(result.read_text()).get("error")
    except (ValueError, IndexError, OSError, AttributeError):
        return None
    return str(error).strip().splitlines()[-1][:400] if error else None


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:400] if lines else "no output"


class TallyBlock(Tally):
    """tally with block-level scheduling, end to end through the CLI. Per BE workload, once per
    system (group), before its worker starts (prepare_role):

      1. capture: the BE worker runs a few steps under
         `tally run --priority best-effort --save-modules --` with TALLY_CACHE_DIR=<dir>/cache,
         so the agent saves the code images it loads to <dir>/cache/modules (no HP client needed);
      2. prepare: `tally blocksched prepare --modules <dir>/cache/modules --compile sm_XY --modes slice
         --plan <dir>/plan` (report in <dir>/prepare.log, at most prepare_timeout_s);
      3. the measured BE worker: `tally run --priority best-effort --block-level --plan <dir>/plan
         --stats-dir ... --` with the same TALLY_CACHE_DIR (transformed kernels, the program's profile).

    A capture or prepare that fails fails the runs of that BE workload with a one-line reason
    (never a silent launch-level run). HP workers are launched as under `tally`.
    """

    name = "tally-block"
    description = ("tally daemon + agent, block-level scheduling: BE kernels captured (tally run --save-modules), "
                   "prepared (tally blocksched prepare --modes slice) and run as slices (tally run --block-level)")

    def __init__(self, tally_command: list[str] | None = None, timeout_s: float = 120.0,
                 prepare_timeout_s: float = 300.0, capture_s: float = 1.0, capture_steps: int = 2,
                 arch: str | None = None, name: str | None = None, up_args: list[str] | None = None,
                 agent_env: dict | None = None, hp_env: dict | None = None):
        super().__init__(tally_command=tally_command, timeout_s=timeout_s, up_args=up_args,
                         name=name or "tally-block", agent_env=agent_env, hp_env=hp_env)
        self.prepare_timeout_s = prepare_timeout_s
        self.capture_s = capture_s          # the capture run: warm-up steps, then this many seconds of steps
        self.capture_steps = capture_steps
        self.arch = arch
        self._prepared: dict[str, Path | str] = {}  # BE ref -> its dir (with plan and cache), or why it failed
        self._kernels: dict[str, int | None] = {}  # BE ref -> kernels in its plan (None: not known)

    def unavailable_reason(self) -> str | None:
        return block_level_missing()

    def needs_preparation(self, role: str) -> bool:
        return role == "be"

    def capture_args(self, worker_argv: list[str]) -> list[str]:
        """The worker's argv for the capture run: a few warm-up steps, then capture_s seconds of steps."""
        return list(worker_argv) + ["--warmup-steps", str(self.capture_steps), "--warmup-s", "0",
                                    "--duration", f"{self.capture_s:g}"]

    def prepare_role(self, role: str, ref: str, workdir: Path, worker_argv: list[str], execute: Execute,
                     capture_timeout_s: float) -> None:
        if role != "be":
            return
        known = self._prepared.get(ref)
        if isinstance(known, Path):
            return
        if isinstance(known, str):
            raise TallyError(known)  # failed once in this group: the same reason, without a second attempt
        try:
            self._prepared[ref] = self._prepare(ref, Path(workdir), worker_argv, execute, capture_timeout_s)
        except TallyError as exc:
            self._prepared[ref] = str(exc)
            raise

    def _cache_env(self, workdir: Path) -> dict[str, str]:
        assert self._runtime_dir is not None, "start() first"
        return {"TALLY_RUNTIME_DIR": str(self._runtime_dir), "TALLY_CACHE_DIR": str(workdir / "cache")}

    def _prepare(self, ref: str, workdir: Path, worker_argv: list[str], execute: Execute,
                 capture_timeout_s: float) -> Path:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        env = self._cache_env(workdir)
        modules = workdir / "cache" / "modules"
        capture = self.tally_command + ["run", "--priority", "best-effort", "--save-modules", "--"]
        log = workdir / "capture.log"
        # TALLY_MODULE_DIR explicitly: `tally run --save-modules` keeps one the environment already has
        rc = execute(capture + self.capture_args(worker_argv), {**env, "TALLY_MODULE_DIR": str(modules)}, log,
                     capture_timeout_s)
        if rc != 0:
            raise TallyError(f"tally-block: the capture run of {ref} failed (status {rc}): "
                             f"{_worker_error(worker_argv) or _last_line(log)}")
        images = sorted(p for p in modules.iterdir() if p.is_file()) if modules.is_dir() else []
        if not images:
            raise TallyError(f"tally-block: the capture run of {ref} saved no code image in {modules} "
                             "(did the agent run? see capture.log)")
        arch = self.arch or gpu_arch()
        plan = workdir / "plan"
        log = workdir / "prepare.log"
        argv = self.tally_command + ["blocksched", "prepare", "--modules", str(modules), "--compile", arch,
                                     "--modes", "slice", "--plan", str(plan)]
        rc = execute(argv, env, log, self.prepare_timeout_s)
        if rc != 0:
            raise TallyError(f"tally-block: `tally blocksched prepare` for {ref} failed (status {rc}): "
                             f"{_last_line(log)}")
        if not plan.is_file():
            raise TallyError(f"tally-block: `tally blocksched prepare` for {ref} wrote no plan ({plan})")
        kernels = plan_kernels(plan)
        if kernels == 0:
            # `tally run --block-level` would run every kernel whole: a launch-level run under this name
            raise TallyError(f"tally-block: `tally blocksched prepare` put no kernel of {ref} in the plan "
                             f"(nothing to slice; see {log})")
        self._kernels[ref] = kernels
        return workdir

    def plan(self, ref: str) -> Path | None:
        workdir = self._prepared.get(ref)
        return workdir / "plan" if isinstance(workdir, Path) else None

    def launch(self, role: str, ref: str | None = None, stats_dir: Path | None = None) -> RoleLaunch:
        if role != "be":
            return super().launch(role, ref, stats_dir)
        workdir = self._prepared.get(ref) if ref is not None else None
        if not isinstance(workdir, Path):
            raise TallyError(f"tally-block: BE workload {ref} has no plan (prepare_role first)")
        # no TALLY_MODULE_DIR: the agent would save every image the measured run loads
        return RoleLaunch(env=self._cache_env(workdir),
                          prefix=self.tally_command + ["run", "--priority", "best-effort", "--block-level",
                                                       "--plan", str(workdir / "plan")]
                          + _stats_args(stats_dir) + ["--"], unset=("TALLY_MODULE_DIR",))

    def describe(self) -> dict:
        out = super().describe()
        out["plans"] = {ref: {"plan": str(v / "plan"), "kernels": self._kernels.get(ref)} if isinstance(v, Path)
                        else {"failed": v} for ref, v in self._prepared.items()}
        return out


def plan_kernels(plan: Path) -> int | None:
    """Kernels in a block-level plan (tally.blocksched.plan, checking that its cubins exist); None when
    this tally cannot read plans; TallyError (one line) for a plan that does not read."""
    try:
        from tally.blocksched.plan import read_plan
    except ImportError:
        return None
    try:
        return len(read_plan(plan, check="exists").entries)
    except TallyError as exc:
        raise TallyError(f"tally-block: {exc}") from None


# `tally up` options a bench system name may set: tally[budget-us=1000;idle-window-us=2000],
# tally-block[budget-us=25] (';' because system lists are comma-separated)
TALLY_TUNABLES = ("idle-window-us", "budget-us", "unthrottle-ms")
# and agent switches of the BE client (docs/operations.md): tally[batch-writes=1], tally[kernel-times=1],
# tally[run-ahead=1], tally[gpu-gate=1]
AGENT_TUNABLES = {"batch-writes": "TALLY_BATCH_WRITES", "kernel-times": "TALLY_KERNEL_TIMES",
                  "run-ahead": "TALLY_RUN_AHEAD", "gpu-gate": "TALLY_GPU_GATE"}
# and what the HP program itself may choose: tally[hp-stream-priority=1] runs its requests on the
# device's greatest stream priority, as mps-priority does (tally leaves HP streams alone: docs/scheduling.md)
HP_TUNABLES = {"hp-stream-priority": (HP_STREAM_PRIORITY_ENV, "high")}
# and the share of SMs MPS lets the BE client use: tally[be-thread-percent=80]
# (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, as mps-split sets it): the rest is always free for HP's first blocks
BE_THREAD_PERCENT = "be-thread-percent"


def tally_variant(name: str) -> Tally:
    """A tally or tally-block system with policy parameters in its name, so each variant is its own run."""
    base, _, rest = name.partition("[")
    settings = rest[:-1]
    args: list[str] = []
    agent_env: dict[str, str] = {}
    hp_env: dict[str, str] = {}
    for item in filter(None, settings.split(";")):
        key, sep, value = item.partition("=")
        if sep and (key in AGENT_TUNABLES or key in HP_TUNABLES):
            if value not in ("0", "1"):
                raise TallyError(f"system {name!r}: {key} is 0 or 1, not {value!r}")
            if key in AGENT_TUNABLES:
                agent_env[AGENT_TUNABLES[key]] = value
            elif value == "1":
                variable, setting = HP_TUNABLES[key]
                hp_env[variable] = setting
            continue
        if sep and key == BE_THREAD_PERCENT:
            if not (value.isdigit() and 1 <= int(value) <= 100):
                raise TallyError(f"system {name!r}: {key} is a whole percentage 1..100, not {value!r}")
            agent_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(int(value))
            continue
        if not sep or key not in TALLY_TUNABLES:
            raise TallyError(f"system {name!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join((*TALLY_TUNABLES, *AGENT_TUNABLES, *HP_TUNABLES, BE_THREAD_PERCENT))}")
        try:
            float(value)
        except ValueError:
            raise TallyError(f"system {name!r}: {key} needs a number, not {value!r}") from None
        args += [f"--{key}", value]
    if base == "tally-block":
        return TallyBlock(up_args=args, name=name, agent_env=agent_env, hp_env=hp_env)
    return Tally(up_args=args, name=name, agent_env=agent_env, hp_env=hp_env)


def make_system(name: str, mps_split_percent: int = 50, mps_factory: Callable | None = None,
                tally_command: list[str] | None = None) -> System:
    """`tally_command`: how tally systems call the CLI (default `python -m tally`; tests give a fake)."""
    if name.startswith(("tally[", "tally-block[")) and name.endswith("]"):
        variant = tally_variant(name)
        if tally_command:
            variant.tally_command = list(tally_command)
        return variant
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
        tgs = Tally(tally_command=tally_command, up_args=["--policy", "tgs"], name="tgs")
        tgs.description = ("TGS-style adaptive rate control of BE launches (NSDI'23): tally agent + daemon, "
                           "`tally up --policy tgs`")
        return tgs
    if name == "tally":
        return Tally(tally_command=tally_command)
    if name == "tally-block":
        return TallyBlock(tally_command=tally_command)
    raise TallyError(f"unknown system {name!r} (systems: {', '.join(SYSTEM_NAMES)})")
