"""`tally ptx check` and `tally ptx transform`."""
from __future__ import annotations

from pathlib import Path

import click

from tally.errors import TallyError
from tally.ptx import abi
from tally.ptx.analysis import MODES, refusal
from tally.ptx.parse import read_module
from tally.ptx.transform import transform_module


@click.group("ptx", context_settings={"help_option_names": ["-h", "--help"]})
def ptx_group():
    """Check and transform PTX kernels (slicing, persistent thread blocks)."""


@ptx_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mode", "modes", type=click.Choice(MODES), multiple=True, help="Modes to check (default: all).")
def check_command(path: Path, modes: tuple[str, ...]):
    """Print, per entry, "transformable" or the reason it is not."""
    module = read_module(path)
    modes = modes or MODES
    if not module.entries:
        click.echo("no .entry kernels in this module")
        return
    for entry in module.entries:
        reasons = {mode: refusal(module, entry, mode) for mode in modes}
        if not any(reasons.values()):
            click.echo(f"{entry.name}: transformable")
        elif len(set(reasons.values())) == 1:
            click.echo(f"{entry.name}: not transformable: {next(iter(reasons.values()))}")
        else:
            parts = [f"{mode}: " + (f"not transformable: {reason}" if reason else "transformable")
                     for mode, reason in reasons.items()]
            click.echo(f"{entry.name}: " + "; ".join(parts))


@ptx_group.command("transform")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(MODES), required=True, help="The transformation.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the module with the new entries.")
@click.option("--entry", "entries", multiple=True, help="Only these entries (default: all).")
def transform_command(path: Path, mode: str, output: Path, entries: tuple[str, ...]):
    """Write the module with a new entry per transformable kernel; print the new entries' ABI."""
    module = read_module(path)
    result = transform_module(module, mode, list(entries) or None)
    try:
        output.write_text(result.text)
    except OSError as exc:
        raise TallyError(f"cannot write {output}: {exc.strerror or exc}") from None
    for entry in result.entries:
        if entry.refusal:
            click.echo(f"{entry.entry}: not transformable: {entry.refusal}")
            continue
        params = ", ".join(f"{ptx_type[1:]} {name}" for name, ptx_type in entry.appended_params)
        click.echo(f"{entry.entry} -> {entry.new_entry}  (appended: {params})")
    if mode == "slice":
        click.echo("ABI: launch any grid; block L of the slice runs original block block_offset + L (x fastest).")
    else:
        click.echo(
            f"ABI: launch (workers,1,1) x original block; state = {abi.SLOTS_OFFSET} + {abi.SLOT_STRIDE}*workers "
            f"zeroed bytes {{u32 next_index @{abi.NEXT_INDEX_OFFSET}, u32 retreat @{abi.RETREAT_OFFSET}, "
            f"u32 reserved[2], u32 slot[workers][2] @{abi.SLOTS_OFFSET}}}; no shared memory added"
            + ("; set retreat != 0 to preempt, clear it and relaunch with the same state to resume"
               if mode == "preemptible" else "")
        )
    done = sum(1 for entry in result.entries if not entry.refusal)
    click.echo(f"wrote {output} ({done} of {len(result.entries)} entries transformed)")
