"""`tally run`: start a program with the agent injected.

The launcher only prepares the environment and then *replaces itself* with the
program (exec), so the program keeps tally's PID, stdin/stdout/stderr, exit code
and signals exactly as if it had been started directly. All per-launch work
happens in the agent inside the program.
"""
from __future__ import annotations

import os
import shutil

import click

from tally import cudalibs
from tally.errors import TallyError
from tally.scoreboard import POLICY_TALLY

PRIORITIES = ("high", "best-effort")


def agent_env(command: list[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes the CUDA driver load the agent into `command`."""
    env = dict(os.environ if base is None else base)
    agent = str(cudalibs.agent_path())
    previous = env.get("CUDA_INJECTION64_PATH")
    if previous and previous != agent:
        # Another injection (e.g. a profiler) keeps running: the agent loads it first.
        env["TALLY_CHAINED_INJECTION"] = previous
    env["CUDA_INJECTION64_PATH"] = agent
    python = command[0] if command else None
    candidates = cudalibs.cupti_candidates(python)
    if candidates and "TALLY_CUPTI_PATH" not in env:
        env["TALLY_CUPTI_SEARCH"] = ":".join(str(c.path) for c in candidates)
    return env


def _client_device_count(env: dict[str, str], state: dict) -> int:
    """How many CUDA devices the client will see (MPS limits are per
    device ordinal): CUDA_VISIBLE_DEVICES's entries, else the GPUs visible."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([entry for entry in visible.split(",") if entry.strip()])
    from tally import gpus as gpumod

    return len(gpumod.list_gpus()) or len(state.get("gpus", []))


def block_level_plan(priority: str | None, block_level: bool, plan_path: str | None) -> str:
    """The absolute path of the block-level plan `tally run --block-level [--plan PATH]` hands the
    agent (TALLY_BLOCKSCHED_PLAN), after checking it reads; one-line TallyErrors otherwise."""
    from tally.blocksched.plan import default_plan_path, read_plan

    if not block_level:
        raise TallyError("--plan needs --block-level: the plan is only read for block-level scheduling")
    if priority != "best-effort":
        raise TallyError("--block-level needs --priority best-effort: only best-effort kernels are sliced")
    path = os.path.abspath(plan_path if plan_path is not None else default_plan_path())
    if not os.path.lexists(path):
        raise TallyError(f"no block-level plan at {path}: run `tally blocksched prepare --compile sm_XX` first "
                         "(sm_XX: the GPU's architecture, e.g. sm_90)")
    plan = read_plan(path, check="exists")
    if not plan.entries:
        click.echo(f"tally: warning: the block-level plan {path} has no kernels; every kernel runs whole",
                   err=True)
    return path


def exec_command(command: list[str], env: dict[str, str]) -> None:
    """Replace this process with `command`; never returns."""
    if shutil.which(command[0], path=env.get("PATH")) is None and not os.path.exists(command[0]):
        raise NotFound(command[0])
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise TallyError(f"cannot run {command[0]}: {exc.strerror}") from exc


class NotFound(TallyError):
    exit_code = 127

    def __init__(self, name: str):
        super().__init__(f"command not found: {name}")


@click.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default=None,
    help="Join the node daemon's scheduler as a high-priority or best-effort client. "
    "Without it the agent only observes (counts launches).",
)
@click.option("--auto-up", is_flag=True, help="Start the node daemon if none is running.")
@click.option(
    "--memory-limit",
    default=None,
    metavar="SIZE",
    help="Device memory this program may allocate, per GPU it sees (e.g. 8G, or 0=8G,1=4G per device "
    "ordinal): MPS's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT. Needs --priority and a daemon with MPS. "
    "Default: [client] memory_limit of the config.",
)
@click.option(
    "--stats-dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help="Write each process's launch counts to DIR/stats-<pid>.json at exit.",
)
@click.option(
    "--slo-p99-ms",
    type=float,
    default=None,
    metavar="MS",
    help="SLO mode (with --priority high): the daemon adapts how much best-effort work it admits to hold "
    "this program's p99 latency under MS milliseconds (docs/operations.md, SLO mode).",
)
@click.option(
    "--save-modules",
    is_flag=True,
    help="Save the code images (PTX, fatbins, cubins) the program loads to the cache's modules/ dir, "
    "for `tally blocksched prepare` (experimental; docs/blocksched.md).",
)
@click.option(
    "--block-level",
    is_flag=True,
    help="With --priority best-effort: the agent launches the kernels of the block-level plan as slices "
    "(`tally blocksched prepare --compile ARCH` writes the plan; experimental, docs/blocksched.md).",
)
@click.option(
    "--plan",
    "plan_path",
    default=None,
    metavar="PATH",
    help="The block-level plan for --block-level (default: <cache dir>/blocksched/plan).",
)
@click.option(
    "--run-ahead",
    is_flag=True,
    help="With --priority best-effort, instead of the GPU-side gate: a launch the launch-level gate holds waits "
    "on the GPU, not in the program's thread (docs/scheduling.md, run-ahead admission; it measured less "
    "best-effort throughput than the GPU-side gate, with high-priority p99 as good or worse).",
)
@click.option(
    "--gpu-gate/--no-gpu-gate",
    default=None,
    help="With --priority best-effort (default: on; off with --run-ahead or --block-level): while a "
    "high-priority client is connected, each "
    "best-effort kernel waits on the GPU for a gate word that high-priority launches close, instead of "
    "being held in the program's thread (docs/scheduling.md, the GPU-side gate). --no-gpu-gate holds "
    "launches in the program's thread; a TALLY_GPU_GATE in the environment wins over the default, and "
    "--run-ahead over both.",
)
@click.option("--verbose", is_flag=True, help="The agent says when it is active.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(priority, auto_up, memory_limit, stats_dir, slo_p99_ms, save_modules, block_level, plan_path,
                run_ahead, gpu_gate, verbose, command):
    """Run COMMAND with the tally agent injected.

    Use `--` before the command: tally run --priority high -- python serve.py
    """
    command = list(command)
    env = agent_env(command)
    if memory_limit is not None and not priority:
        raise TallyError("--memory-limit needs --priority: the limit is MPS's, and only clients of the "
                         "tally daemon run under its MPS")
    if slo_p99_ms is not None:
        if priority != "high":
            raise TallyError("--slo-p99-ms needs --priority high: the SLO is a high-priority program's latency target")
        if not slo_p99_ms > 0 or slo_p99_ms > 1e9:
            raise TallyError(f"--slo-p99-ms must be a positive number of milliseconds, not {slo_p99_ms:g}")
        env["TALLY_SLO_P99_MS"] = repr(slo_p99_ms)
    if block_level or plan_path is not None:
        env["TALLY_BLOCKSCHED_PLAN"] = block_level_plan(priority, block_level, plan_path)
    if gpu_gate is not None and priority != "best-effort":
        raise TallyError(f"--{'' if gpu_gate else 'no-'}gpu-gate needs --priority best-effort: "
                         "only best-effort launches are gated")
    if run_ahead and priority != "best-effort":
        raise TallyError("--run-ahead needs --priority best-effort: only best-effort launches are held")
    if gpu_gate and (run_ahead or env.get("TALLY_RUN_AHEAD") == "1"):
        raise TallyError("--gpu-gate and run-ahead (--run-ahead or TALLY_RUN_AHEAD=1) both hold launches on the "
                         "GPU: pick one")
    if run_ahead:
        env["TALLY_RUN_AHEAD"] = "1"
        gpu_gate = False  # run-ahead is the other way of waiting on the GPU
    if priority == "best-effort" and (gpu_gate is not None or "TALLY_GPU_GATE" not in env):
        # on by default (measured: benchmarks/results/issue3-gpu-gate-2026-12-03e-h200), except
        # under run-ahead, the other way of waiting on the GPU, set in the environment, and under
        # block-level scheduling, which was measured with the launch-level gate (its GPU-gated
        # slices, --block-level --gpu-gate, have not run on a GPU yet)
        default_on = env.get("TALLY_RUN_AHEAD") != "1" and not env.get("TALLY_BLOCKSCHED_PLAN")
        env["TALLY_GPU_GATE"] = "1" if (gpu_gate if gpu_gate is not None else default_on) else "0"
    if priority:
        from tally import config as cfgmod
        from tally.daemon.client import client_env, ensure_daemon, version_skew

        cfg = cfgmod.load()
        if priority == "high":
            cfg.check_high_priority()
        explicit_limit = memory_limit is not None
        if explicit_limit:
            cfgmod.parse_memory_limit(memory_limit)
        elif "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env:  # the user's own setting wins over the config
            memory_limit = cfg.memory_limit
        state = ensure_daemon(auto_up=auto_up)
        error, warning = version_skew(state)
        if error:
            raise TallyError(error)
        if warning:
            click.echo(f"tally: warning: {warning}", err=True)
        joined = client_env(state, priority)
        if "CUDA_MPS_CLIENT_PRIORITY" in env:
            joined.pop("CUDA_MPS_CLIENT_PRIORITY", None)  # the user's own choice wins
        env.update(joined)
        env["TALLY_PRIORITY"] = priority
        policy = (state.get("params") or {}).get("policy")
        if slo_p99_ms is not None and policy is not None and policy != POLICY_TALLY:
            click.echo("tally: warning: --slo-p99-ms is acted on under policy tally only; the running daemon "
                       "uses another policy", err=True)
        if memory_limit is not None and not state.get("mps"):
            if explicit_limit:
                raise TallyError("--memory-limit needs MPS, but the running tally daemon has none "
                                 "(started with --no-mps): restart it with MPS, or drop the limit")
            click.echo(f"tally: warning: the config's memory_limit {memory_limit} is not applied: "
                       "the running tally daemon has no MPS", err=True)
            memory_limit = None
        if memory_limit is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = cfgmod.mps_memory_limit(
                memory_limit, _client_device_count(env, state))
        if priority == "best-effort" and "TALLY_PROFILE_FILE" not in env:
            from tally.profiles import profile_path  # kernel duration estimates persist per program

            env["TALLY_PROFILE_FILE"] = str(profile_path(command, env.get("PATH")))
    if block_level and not stats_dir and "TALLY_STATS_DIR" not in env:
        # what the agent did with the plan, for `tally blocksched show -- COMMAND` (the last run's)
        from tally.blocksched import live

        directory = live.live_dir(command, env.get("PATH"))
        try:
            live.start_run(directory)
            env["TALLY_STATS_DIR"] = str(directory)
        except TallyError as exc:  # a report of the run, not worth failing the run for
            click.echo(f"tally: warning: {exc}; `tally blocksched show` will not have this run", err=True)
    if stats_dir:
        try:
            os.makedirs(stats_dir, exist_ok=True)
        except OSError as exc:
            raise TallyError(f"cannot create --stats-dir {stats_dir}: {exc.strerror or exc}") from None
        env["TALLY_STATS_DIR"] = os.path.abspath(stats_dir)
    if save_modules and "TALLY_MODULE_DIR" not in env:
        from tally.paths import cache_dir

        env["TALLY_MODULE_DIR"] = str(cache_dir() / "modules")
    if verbose:
        env["TALLY_VERBOSE"] = "1"
    exec_command(command, env)
