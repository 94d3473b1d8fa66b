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
    "--stats-dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help="Write each process's launch counts to DIR/stats-<pid>.json at exit.",
)
@click.option("--verbose", is_flag=True, help="The agent says when it is active.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(priority, auto_up, stats_dir, verbose, command):
    """Run COMMAND with the tally agent injected.

    Use `--` before the command: tally run --priority high -- python serve.py
    """
    command = list(command)
    env = agent_env(command)
    if priority:
        from tally.daemon.client import client_env, ensure_daemon

        state = ensure_daemon(auto_up=auto_up)
        joined = client_env(state, priority)
        if "CUDA_MPS_CLIENT_PRIORITY" in env:
            joined.pop("CUDA_MPS_CLIENT_PRIORITY", None)  # the user's own choice wins
        env.update(joined)
        env["TALLY_PRIORITY"] = priority
    if stats_dir:
        os.makedirs(stats_dir, exist_ok=True)
        env["TALLY_STATS_DIR"] = os.path.abspath(stats_dir)
    if verbose:
        env["TALLY_VERBOSE"] = "1"
    exec_command(command, env)
