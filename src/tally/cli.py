"""The `tally` command line.

Subcommands live next to the code they drive and are imported only when used,
so `tally run` starts the user's program without importing the PTX toolchain or
the benchmark harness.
"""
from __future__ import annotations

import importlib
import sys

import click

from tally import __version__
from tally.errors import TallyError

# name -> "module:attribute" of a click command
SUBCOMMANDS = {
    "run": "tally.launcher:run_command",
    "trace": "tally.trace:trace_command",
    "doctor": "tally.doctor:doctor_command",
    "ptx": "tally.ptx.cli:ptx_group",
    "up": "tally.daemon.cli:up_command",
    "down": "tally.daemon.cli:down_command",
    "status": "tally.daemon.cli:status_command",
    "bench": "tally.bench.cli:bench_command",
    "profiles": "tally.profiles:profiles_group",
    "blocksched": "tally.blocksched.cli:blocksched_group",
}

HELP = {
    "run": "Run a command with the tally agent injected.",
    "trace": "Record every kernel launch of a command, or summarize a trace.",
    "doctor": "Check the driver, CUDA, CUPTI and MPS; say what is missing.",
    "ptx": "Check and transform PTX kernels (slicing, persistent blocks).",
    "up": "Start the node daemon (MPS, scoreboards, metrics).",
    "down": "Stop the node daemon and everything it started.",
    "status": "Show the daemon, its GPUs and its clients.",
    "bench": "Run the co-location benchmark (HP inference next to BE training).",
    "profiles": "Show or seed (from a trace) a program's kernel duration profiles.",
    "blocksched": "Show per-kernel block scheduling choices and the kernel cache.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("tally"):
                return _unavailable(name)
            raise
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP[name]) for name in SUBCOMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str) -> click.Command:
    @click.command(name, help=HELP[name], context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args):
        raise TallyError(f"'tally {name}' is not part of this build of tally")

    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tally")
def cli():
    """tally: share one NVIDIA GPU between latency-critical inference and training."""


def main(argv: list[str] | None = None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="tally", standalone_mode=False)
    except TallyError as exc:
        click.echo(f"tally: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("tally: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # One line, like every other tally error; the help is one flag away.
        where = exc.ctx.command_path if exc.ctx else "tally"
        click.echo(f"tally: error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"tally: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
