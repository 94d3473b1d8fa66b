"""`tally blocksched show|candidates|cache|prepare|plan`."""
from __future__ import annotations

from pathlib import Path

import click

from tally.blocksched import decisions, live
from tally.blocksched.candidates import enumerate_candidates
from tally.blocksched.choose import DEFAULT_BOUND_NS, DEFAULT_FLOOR, Policy, choose, evaluate, fmt_ns
from tally.errors import TallyError
from tally.profiles import command_file

_CMD = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.group("blocksched", context_settings={"help_option_names": ["-h", "--help"]})
def blocksched_group():
    """Block-level scheduling: chosen kernel configurations, candidates, the kernel cache.

    \b
    tally blocksched show -- python train.py            # per kernel: configuration and why
    tally blocksched show --bound-us 31.6 -- python train.py   # re-choose under another bound
    tally blocksched candidates --grid 4096 --block 256 --sms 132
    tally blocksched cache [--clear]
    tally blocksched prepare [--modules DIR] [--modes slice] [--compile sm_90 [--plan PATH]] [--json]
    tally blocksched plan [--plan PATH] [--verify]      # the kernels `tally run --block-level` slices
    """


def _dims(text: str, what: str) -> tuple[int, int, int]:
    try:
        dims = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise TallyError(f"--{what} must be 1 to 3 positive integers like 4096 or 64,64,1, got {text!r}") from None
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise TallyError(f"--{what} must be 1 to 3 positive integers like 4096 or 64,64,1, got {text!r}")
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _short_name(mangled: str) -> str:
    """A kernel's demangled name, cut to 60 characters for one-line reports."""
    from tally.trace import demangle

    name = demangle(mangled)
    return name if len(name) <= 60 else name[:57] + "..."


def format_entry(entry: decisions.Entry, decision=None) -> str:
    """One line per kernel: 'name grid block -> reason' (what trace/status can print)."""
    r = entry.record
    d = decision or entry.decision
    name = _short_name(r.name)
    grid = "x".join(map(str, r.grid))
    block = "x".join(map(str, r.block))
    return f"{name}  grid {grid} block {block}: {d.reason if d else 'no decision yet'}"


@blocksched_group.command("show", context_settings=_CMD)
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A block scheduling file, instead of the one of a command.")
@click.option("--live", "live_path", type=click.Path(path_type=Path), default=None,
              help="The stats file or --stats-dir of a `tally run --block-level` run, instead of the "
                   "command's last run.")
@click.option("--bound-us", type=float, default=None, help="Re-choose under this turnaround bound (microseconds).")
@click.option("--floor", type=float, default=None, help="Re-choose with this speed floor (0 < floor <= 1).")
@click.option("-v", "--verbose", is_flag=True, help="Also list every measured candidate.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def show_command(file, live_path, bound_us, floor, verbose, command):
    """Per kernel of COMMAND: the configuration chosen and why.

    Two records, each shown when it exists: the block scheduling file (measured candidates and
    the offline choice), and what the agent did in the program's last `tally run --block-level`
    (sliced or whole, the slice size and what it was sized from, or why it ran whole).
    """
    if command and command[0] == "--":
        command = command[1:]
    if live_path is not None and not live_path.exists():
        raise TallyError(f"no stats file or directory {live_path}")
    path = None
    if file is None and command:  # the command's records: each shown when it exists
        path = decisions.decisions_path(list(command))
        if live_path is None:
            live_path = live.live_dir(list(command))
            if not path.exists() and not live_path.exists():
                raise TallyError(f"no block scheduling records for this program (neither {path} nor "
                                 f"{live_path}): run it with `tally run --priority best-effort --block-level`")
            live_path = live_path if live_path.exists() else None
        path = path if path.exists() else None
    elif file is not None or live_path is None:  # --file, or the one-line error for what is missing
        path = command_file(command, file, decisions.decisions_path)
    if path is not None:
        _show_decisions(path, bound_us, floor, verbose)
    if live_path is not None:
        _show_live(live_path)


def _show_decisions(path: Path, bound_us, floor, verbose) -> None:
    entries = decisions.read(path, missing_ok=False)
    rechoose = bound_us is not None or floor is not None
    policy = None
    if rechoose:
        policy = Policy(DEFAULT_BOUND_NS if bound_us is None else bound_us * 1e3,
                        DEFAULT_FLOOR if floor is None else floor)
    head = f"{path}: {len(entries)} kernel configuration(s)"
    if policy:
        head += f", re-chosen with bound {fmt_ns(policy.bound_ns)} and floor {policy.floor:g}x"
    click.echo(head)
    for e in entries:
        decision = choose(e.record, policy) if policy else e.decision
        click.echo(format_entry(e, decision))
        if verbose:
            bound = (policy or decision).bound_ns if (policy or decision) else DEFAULT_BOUND_NS
            for row in evaluate(e.record):
                click.echo(f"    {row.summary(e.record.grid, bound)}")


def _show_live(path: Path) -> None:
    kernels, processes = live.read(path)
    click.echo(f"{path}: last block-level run, {processes} process(es) with a plan, "
               f"{len(kernels)} planned kernel(s) launched")
    for k in kernels:
        click.echo(f"{_short_name(k.entry)}: {k.describe()}")


@blocksched_group.command("candidates")
@click.option("--grid", required=True, help="Original grid, e.g. 4096 or 64,64,1.")
@click.option("--block", required=True, help="Block shape, e.g. 256 or 16,16.")
@click.option("--sms", type=click.IntRange(1, 1 << 16), required=True, help="SMs of the GPU.")
@click.option("--occupancy", type=click.IntRange(1, 1024), default=None,
              help="Resident blocks per SM the kernel allows (default: thread limit only).")
@click.option("--kernel-us", type=click.FloatRange(0, min_open=True), default=None,
              help="The original kernel's duration (adds slices sized for the bound).")
@click.option("--bound-us", type=click.FloatRange(0, min_open=True), default=DEFAULT_BOUND_NS / 1e3,
              show_default=True, help="Turnaround bound (microseconds).")
def candidates_command(grid, block, sms, occupancy, kernel_us, bound_us):
    """List the configurations that would be measured for one launch."""
    g, b = _dims(grid, "grid"), _dims(block, "block")
    try:
        found = enumerate_candidates(g, b, sms, occupancy=occupancy, bound_ns=bound_us * 1e3,
                                     kernel_ns=None if kernel_us is None else kernel_us * 1e3)
    except ValueError as exc:
        raise TallyError(str(exc)) from None
    for c in found:
        if c.mode == "slice":
            launch = f"{c.launches(g)} launches of <= {c.size} blocks"
        elif c.mode == "original":
            launch = f"1 launch of {'x'.join(map(str, g))}"
        else:
            launch = f"1 launch of {c.launch_grid(g)[0]} workers, <= {c.waves(g)} blocks each"
        click.echo(f"{c.key:<20} {launch}")


@blocksched_group.command("cache")
@click.option("--clear", is_flag=True, help="Remove every cached transformed kernel.")
def cache_command(clear):
    """Where transformed kernels are cached, and how many."""
    from tally.blocksched.cache import KernelCache

    cache = KernelCache()
    if clear:
        cache.clear()
        click.echo(f"removed {cache.root}")
        return
    s = cache.stats()
    click.echo(f"{cache.dir}: {s['ok']} transformed, {s['refused']} refused, {s['other']} unreadable; "
               f"{s['bytes'] / 1e6:.1f} MB")


@blocksched_group.command("prepare")
@click.option("--modules", "modules", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of saved code images (default: <cache dir>/modules).")
@click.option("--triton-cache", "triton_cache", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Triton cache directory to find ELF images' PTX in (repeatable; default: Triton's and "
                   "PyTorch Inductor's).")
@click.option("--modes", "modes", default=None, metavar="MODES",
              help="Transformations to prepare, comma-separated (default: slice,ptb,preemptible; the agent "
                   "needs slice).")
@click.option("--compile", "compile_arch", metavar="ARCH", default=None,
              help="Also assemble each transformed module with ptxas for ARCH (e.g. sm_90), cache the cubins "
                   "and write the block-level plan.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the block-level plan (default: <cache dir>/blocksched/plan; its cubins go "
                   "to cubins/ next to it). Needs --compile.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prepare_command(modules, triton_cache, modes, compile_arch, plan_path, as_json):
    """Transform the kernels of every saved code image, through the kernel cache."""
    import json

    from tally.blocksched.plan import default_plan_path
    from tally.blocksched.prepare import default_module_dir, parse_modes, prepare
    from tally.ptx.analysis import MODES

    modes = parse_modes(modes) if modes is not None else list(MODES)
    if plan_path is not None and compile_arch is None:
        raise TallyError("--plan needs --compile ARCH: the plan names compiled cubins")
    if plan_path is not None and "slice" not in modes:
        raise TallyError("--plan needs mode slice (--modes slice)")
    if plan_path is None and compile_arch is not None and "slice" in modes:
        plan_path = default_plan_path()
    report = prepare(modules if modules is not None else default_module_dir(), modes=modes,
                     triton_dirs=list(triton_cache) or None, compile_arch=compile_arch, plan_path=plan_path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(report.text())


@blocksched_group.command("plan")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The plan to show (default: <cache dir>/blocksched/plan).")
@click.option("--verify", is_flag=True, help="Also check every cubin's FNV-1a-64 against the plan.")
def plan_command(plan_path, verify):
    """The block-level plan: the kernels the agent may launch as slices, and their cubins."""
    from tally.blocksched.plan import default_plan_path, read_plan

    plan = read_plan(plan_path if plan_path is not None else default_plan_path(),
                     check="hash" if verify else "exists")
    cubins = len({e.cubin for e in plan.entries})
    click.echo(f"{plan.path}: {len(plan.entries)} kernel(s) in {cubins} cubin(s)"
               + ("; every cubin matches its hash" if verify else ""))
    for comment in plan.comments:
        click.echo(f"# {comment}")
    for e in plan.entries:
        click.echo(f"{e.image} {e.entry} ({e.nparams} parameters): {e.cubin}")
