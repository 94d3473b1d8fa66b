"""Per-program kernel duration profiles: the reference reader and writer.

A best-effort program's agent learns a duration estimate per (kernel, grid x
block threads) while it runs (agent/sched.c); the profile file carries them from
one run of the program to the next, and from a `tally trace` recording to the
first gated run (`tally profiles seed`). The agent's reader and writer
(agent/profiles.c) follow this module; the format is documented in
docs/scheduling.md ("Profile files"):

    tally-profiles 1 <N>
    <fnv1a64(mangled name), 16 lowercase hex> <grid_threads> <est_ns> <samples> <mangled name>
    ... exactly N such lines, each ending in a newline, nothing after them

Numbers are canonical unsigned decimals (no sign, no leading zeros); est_ns and
samples are 1 .. 2**63-1; a name is 1..4095 bytes without CR, LF or NUL and is
the rest of its line (it may hold spaces); no (hash, grid_threads) twice; at
most 4096 lines. Anything else is not a profile file: `parse` raises TallyError
and the agent ignores the file with one warning.

Where a program's profiles live: `profile_path(command)`, computed by
`tally run` and handed to the agent as TALLY_PROFILE_FILE.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import click

from tally.errors import TallyError
from tally import files
from tally.files import atomic_write
from tally.paths import cache_dir
from tally.trace import format_ns

MAGIC = "tally-profiles"
VERSION = 1
MAX_KERNELS = 4096
MAX_NAME_BYTES = 4095
MAX_FILE_BYTES = 32 << 20
MAX_VALUE = 2**63 - 1

_NUM = rb"(0|[1-9][0-9]{0,19})"
_HEADER = re.compile(rb"tally-profiles (0|[1-9][0-9]{0,19}) (0|[1-9][0-9]{0,19})\n")
_LINE = re.compile(rb"([0-9a-f]{16}) " + _NUM + b" " + _NUM + b" " + _NUM + rb" ([^\r\n\x00]{1,4095})\n")

Key = tuple[int, int]  # (name hash, grid_threads)


def fnv1a64(name: str | bytes) -> int:
    """64-bit FNV-1a of the name's bytes (UTF-8; undecodable bytes kept as read)."""
    return files.fnv1a64(_bytes(name) if isinstance(name, str) else name)


def _bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Profile:
    name: str          # the mangled kernel name
    grid_threads: int  # grid blocks x block threads
    est_ns: int        # estimated duration
    samples: int       # how many timings the estimate rests on

    @property
    def key(self) -> Key:
        return fnv1a64(self.name), self.grid_threads


def persistable(name: str) -> bool:
    """Whether a kernel name can be stored (the format's rule for names)."""
    data = _bytes(name)
    return 0 < len(data) <= MAX_NAME_BYTES and not any(c in data for c in b"\r\n\x00")


# ------------------------------------------------------------------ reading


def parse(data: bytes, source: str = "profile file") -> dict[Key, Profile]:
    """The profiles of a file's bytes; anything but a well-formed file of this
    version raises TallyError (one line)."""
    if not isinstance(data, (bytes, bytearray)):
        raise TallyError(f"{source}: not a tally profile file")
    data = bytes(data)
    if len(data) > MAX_FILE_BYTES or not data.startswith(MAGIC.encode() + b" "):
        raise TallyError(f"{source}: not a tally profile file")
    m = _HEADER.match(data)
    if m is None:
        if re.match(rb"tally-profiles (0|[1-9][0-9]{0,19})[ \n]", data):
            version = int(data.split(b" ", 2)[1].split(b"\n")[0])
            if version != VERSION:
                raise TallyError(f"{source}: profile format version {version}, this tally reads version {VERSION}")
        raise TallyError(f"{source}: malformed profile file header")
    version, count = int(m.group(1)), int(m.group(2))
    if version != VERSION:
        raise TallyError(f"{source}: profile format version {version}, this tally reads version {VERSION}")
    if count > MAX_KERNELS:
        raise TallyError(f"{source}: lists {count} kernels, more than {MAX_KERNELS}")
    pos = m.end()
    out: dict[Key, Profile] = {}
    for i in range(count):
        lm = _LINE.match(data, pos)
        if lm is None:
            raise TallyError(f"{source}: truncated or corrupt at kernel {i + 1} of {count}")
        hash_hex, grid, est, samples, raw_name = lm.groups()
        grid_threads, est_ns, n_samples = int(grid), int(est), int(samples)
        if grid_threads > 2**64 - 1 or not 1 <= est_ns <= MAX_VALUE or not 1 <= n_samples <= MAX_VALUE:
            raise TallyError(f"{source}: kernel {i + 1} has a value out of range")
        h = int(hash_hex, 16)
        if fnv1a64(raw_name) != h:
            raise TallyError(f"{source}: kernel {i + 1}'s name does not match its hash (corrupt file)")
        if (h, grid_threads) in out:
            raise TallyError(f"{source}: kernel {i + 1} is listed twice (corrupt file)")
        out[(h, grid_threads)] = Profile(raw_name.decode("utf-8", "surrogateescape"), grid_threads, est_ns, n_samples)
        pos = lm.end()
    if pos != len(data):
        raise TallyError(f"{source}: bytes after its last kernel (corrupt file)")
    return out


def read(path: Path | str, missing_ok: bool = True) -> dict[Key, Profile]:
    """The profiles in a file; a missing file is empty (or an error, missing_ok=False)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise TallyError(f"no profile file {path}") from None
    except OSError as exc:
        raise TallyError(f"cannot read profile file {path}: {exc.strerror}") from None
    return parse(data, str(path))


# ------------------------------------------------------------------ writing


def _order(profiles: Iterable[Profile]) -> list[Profile]:
    """File order, as the agent writes it: most samples first, then by key; the
    first MAX_KERNELS stay."""
    return sorted(profiles, key=lambda p: (-p.samples, p.key))[:MAX_KERNELS]


def dumps(profiles: Iterable[Profile]) -> bytes:
    """The file's bytes. Kernels whose name cannot be stored are left out."""
    kept = []
    seen: set[Key] = set()
    for p in profiles:
        if not persistable(p.name):
            continue
        if not (0 <= p.grid_threads < 2**64 and 1 <= p.est_ns <= MAX_VALUE and 1 <= p.samples <= MAX_VALUE):
            raise ValueError(f"profile values out of range: {p}")
        if p.key in seen:
            raise ValueError(f"two profiles for one kernel: {p}")
        seen.add(p.key)
        kept.append(p)
    kept = _order(kept)
    lines = [f"{MAGIC} {VERSION} {len(kept)}\n".encode()]
    for p in kept:
        h, g = p.key
        lines.append(f"{h:016x} {g} {p.est_ns} {p.samples} ".encode() + _bytes(p.name) + b"\n")
    return b"".join(lines)


def write(path: Path | str, profiles: Iterable[Profile]) -> None:
    """Writes atomically: a temporary file in the same directory, renamed over
    the old one, so concurrent readers (other runs' agents) see a whole file."""
    atomic_write(Path(path), dumps(profiles), "profile file")


def merge(old: Mapping[Key, Profile], new: Iterable[Profile]) -> dict[Key, Profile]:
    """The agent's merge rule: per kernel the newer estimate wins and the sample
    counts add up; kernels only in `old` stay."""
    out = dict(old)
    for p in new:
        prev = out.get(p.key)
        samples = p.samples if prev is None else min(MAX_VALUE, prev.samples + p.samples)
        out[p.key] = Profile(p.name, p.grid_threads, p.est_ns, samples)
    return out


# ------------------------------------------------------------ from a trace


def from_trace(records: Iterable[dict]) -> list[Profile]:
    """Profiles from `tally trace` kernel records: per (mangled name, grid x
    block threads), the mean duration and the number of executions."""
    from tally.trace import kernel_profiles

    acc: dict[tuple[str, int], list[float]] = {}
    for (name, grid, block), stats in kernel_profiles(records).items():
        threads = 1
        for d in (*grid, *block):
            threads *= int(d)
        total_count = acc.setdefault((name, threads), [0, 0.0])
        total_count[0] += stats["count"]
        total_count[1] += stats["mean_ns"] * stats["count"]
    return [Profile(name, threads, max(1, round(total / count)), count)
            for (name, threads), (count, total) in acc.items() if count and persistable(name)]


# --------------------------------------------------------------- programs

_PYTHON = re.compile(r"python(\d+(\.\d+)?)?[a-z]?$")
_PY_OPTS_WITH_ARG = set("WX")  # -W arg, -X opt (-c and -m end the options)


def _resolve_executable(name: str, path: str | None = None) -> str:
    if os.sep in name:
        return os.path.realpath(name)
    found = shutil.which(name, path=path)
    return os.path.realpath(found) if found else name


def program_identity(command: list[str], env_path: str | None = None) -> str:
    """What makes two runs "the same program": the executable's real path and,
    for a Python interpreter, what it runs (a script's real path, `-m module`,
    or `-c`). Arguments after that do not count: a training script keeps its
    profiles across batch sizes and epochs; kernels that differ get keys of
    their own anyway."""
    if not command:
        raise TallyError("no command given")
    exe = _resolve_executable(command[0], env_path)
    parts = [exe]
    if _PYTHON.match(os.path.basename(exe)) or _PYTHON.match(os.path.basename(command[0])):
        parts.append(_python_target(command[1:]))
    return "\0".join(parts)


def _python_target(args: list[str]) -> str:
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return _script(args[i + 1]) if i + 1 < len(args) else "-"
        if a == "-" or not a.startswith("-"):
            return _script(a)
        if a.startswith("--"):  # --check-hash-based-pycs MODE, --help, --version
            i += 2 if a == "--check-hash-based-pycs" else 1
            continue
        for j, c in enumerate(a[1:], 1):
            rest = a[j + 1:]
            if c == "m":
                return "-m " + (rest or (args[i + 1] if i + 1 < len(args) else ""))
            if c == "c":
                return "-c"
            if c in _PY_OPTS_WITH_ARG:
                if not rest:
                    i += 1  # the argument is the next word
                break
        i += 1
    return "-"  # interactive or stdin


def _script(arg: str) -> str:
    return arg if arg == "-" else os.path.realpath(arg)


def profile_path(command: list[str], env_path: str | None = None) -> Path:
    """The program's profile file: <cache_dir>/profiles/<name>-<hash>.txt, where
    hash is the first 16 hex digits of SHA-256 of program_identity(command) and
    name is the script's or executable's base name (for people reading the
    directory; the hash alone identifies)."""
    identity = program_identity(command, env_path)
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    last = identity.split("\0")[-1]
    base = last.split(" ")[-1] if last.startswith("-m ") else os.path.basename(last)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:48].lstrip(".") or "program"
    return cache_dir() / "profiles" / f"{base}-{digest}.txt"


# -------------------------------------------------------------------- CLI




@click.group("profiles")
def profiles_group():
    """Per-program kernel duration profiles of best-effort programs.

    \b
    tally profiles path -- python train.py
    tally profiles show -- python train.py
    tally profiles seed train-trace.jsonl            # the command recorded in the trace
    tally profiles seed train-trace.jsonl -- python train.py
    """


def command_file(command: tuple[str, ...], file: Path | None, path_of=profile_path,
                 default: list[str] | None = None) -> Path:
    """The per-program file a CLI command works on: `file` (--file), else
    path_of(the command after --), else path_of(default). Also used by
    `tally blocksched` with its decisions files."""
    if command and command[0] == "--":  # click keeps a "--" that follows a positional argument
        command = command[1:]
    if file is not None:
        if command:
            raise TallyError("give either --file PATH or a command, not both")
        return file
    if command:
        return path_of(list(command))
    if default:
        return path_of(default)
    raise TallyError("which program? give its command after --, e.g. -- python train.py")


_FILE_OPTION = click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                            help="A profile file, instead of the one of a command.")


@profiles_group.command("path", context_settings={"ignore_unknown_options": True,
                                                  "allow_interspersed_args": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def path_command(command):
    """Print where COMMAND's profiles live (what `tally run` passes as TALLY_PROFILE_FILE)."""
    click.echo(str(command_file(command, None)))


@profiles_group.command("show", context_settings={"ignore_unknown_options": True,
                                                  "allow_interspersed_args": False})
@_FILE_OPTION
@click.option("--top", default=30, show_default=True, type=click.IntRange(1, MAX_KERNELS))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def show_command(file, top, command):
    """List the kernels in COMMAND's profile file, most-sampled first."""
    from tally.trace import demangle

    path = command_file(command, file)
    profiles = read(path, missing_ok=False)
    click.echo(f"{path}: {len(profiles)} kernel(s)")
    for p in _order(profiles.values())[:top]:
        name = demangle(p.name)
        name = name if len(name) <= 100 else name[:97] + "..."
        click.echo(f"{format_ns(p.est_ns):>10}  {p.samples:>8}  {p.grid_threads:>10}  {name}")


@profiles_group.command("seed", context_settings={"ignore_unknown_options": True,
                                                  "allow_interspersed_args": False})
@_FILE_OPTION
@click.option("--replace", is_flag=True, help="Discard the profiles the file already has.")
@click.argument("trace_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def seed_command(file, replace, trace_file, command):
    """Seed a program's profiles from a `tally trace` recording.

    Every kernel in TRACE_FILE gets its mean duration per grid x block threads as
    the estimate the agent starts from. The program is COMMAND (after --), or
    the command the trace recorded. Kernels already in the file take the
    trace's estimate; their sample counts add up (--replace: start empty).
    """
    from tally.trace import read_trace

    records = list(read_trace(trace_file))
    recorded = next((r.get("command") for r in records if r["type"] == "meta"), None)
    if recorded is not None and not (isinstance(recorded, list) and all(isinstance(a, str) for a in recorded)):
        recorded = None
    path = command_file(command, file, default=recorded)
    seeds = from_trace(records)
    if not seeds:
        raise TallyError(f"{trace_file} has no kernel records to seed from")
    old: dict[Key, Profile] = {}
    if not replace:
        try:
            old = read(path)
        except TallyError as exc:
            click.echo(f"tally: warning: {exc}; it is replaced", err=True)
    merged = merge(old, seeds)
    write(path, merged.values())
    click.echo(f"tally: seeded {len(seeds)} kernel profile(s) from {trace_file} -> {path}", err=True)
