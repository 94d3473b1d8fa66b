"""The block-level plan: which kernels the agent may launch as slices, and from which cubin.

`tally blocksched prepare --compile ARCH` writes it (default
`<cache_dir>/blocksched/plan`) with the cubins it names under `<plan dir>/cubins/`;
`tally run --block-level` hands its absolute path to the agent in
TALLY_BLOCKSCHED_PLAN. The C agent parses exactly this text (format version 1):

    tally-blocksched-plan 1
    # comment lines start with '#'
    slice <image fnv> <entry> <nparams> <cubin fnv> <cubin path>

one kernel a line, fields separated by single spaces, every line ending in a
newline. <image fnv> is the saved image's name (16 lowercase hex digits of the
FNV-1a-64 of the bytes the program loaded), <entry> the original `.entry` name,
<nparams> the number of parameters of the original entry, <cubin fnv> the
FNV-1a-64 of the cubin's bytes (16 lowercase hex digits) and <cubin path> its
absolute path: the last field, running to the end of the line (it may contain
spaces). The cubin is the whole transformed module: it holds
`<entry>__tally_slice` (ABI: tally.ptx.abi) next to the original entries, so
several lines may name one cubin. Kernel lines are sorted by (image, entry);
no (image, entry) appears twice.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tally import files
from tally.errors import TallyError

HEADER = "tally-blocksched-plan 1"
MAX_PLAN_BYTES = 16 << 20  # the agent's PLAN_MAX_BYTES (agent/blocksched.c)
MAX_PARAMS = 1024  # the agent's TALLY_BLOCKSCHED_MAX_PARAMS (agent/agent.h)
_HEX16 = re.compile(r"[0-9a-f]{16}")
_IDENT = re.compile(r"(?:[A-Za-z][A-Za-z0-9_$]*|[_$%][A-Za-z0-9_$]+)")
_COUNT = re.compile(r"0|[1-9][0-9]{0,5}")


@dataclass(frozen=True)
class PlanEntry:
    image: str  # 16 hex: the image's FNV-1a-64
    entry: str  # the original .entry name
    nparams: int  # parameters of the original entry
    cubin_fnv: str  # 16 hex: FNV-1a-64 of the cubin's bytes
    cubin: str  # absolute path of the cubin

    def line(self) -> str:
        return f"slice {self.image} {self.entry} {self.nparams} {self.cubin_fnv} {self.cubin}"


@dataclass(frozen=True)
class Plan:
    path: str
    entries: list[PlanEntry]
    comments: list[str]


def default_plan_path() -> Path:
    from tally.paths import cache_dir

    return cache_dir() / "blocksched" / "plan"


def cubin_dir(plan_path: Path | str) -> Path:
    """Where the cubins of the plan at `plan_path` are kept: `<plan dir>/cubins`."""
    return Path(os.path.abspath(plan_path)).parent / "cubins"


def fnv_hex(data: bytes) -> str:
    return f"{files.fnv1a64(data):016x}"


def plan_text(entries: list[PlanEntry], comments: list[str] = ()) -> str:
    """The plan file's text (kernel lines sorted); raises TallyError for an entry that would not
    read back (what `read_plan` refuses)."""
    out = [HEADER]
    for comment in comments:
        if "\n" in comment or "\r" in comment:
            raise TallyError("a plan comment must be one line")
        out.append("# " + comment if comment else "#")
    seen: set[tuple[str, str]] = set()
    paths: dict[str, str] = {}
    for e in sorted(entries, key=lambda e: (e.image, e.entry)):
        why = _check_entry(e)
        if why:
            raise TallyError(f"cannot write plan line for {e.entry!r}: {why}")
        if (e.image, e.entry) in seen:
            raise TallyError(f"cannot write plan: kernel {e.entry} of image {e.image} twice")
        if paths.setdefault(e.cubin_fnv, e.cubin) != e.cubin:
            raise TallyError(f"cannot write plan: cubin {e.cubin_fnv} named by two paths")
        seen.add((e.image, e.entry))
        out.append(e.line())
    return "\n".join(out) + "\n"


def _check_entry(e: PlanEntry) -> str | None:
    if not _HEX16.fullmatch(e.image):
        return f"image {e.image!r} is not 16 lowercase hex digits"
    if not _IDENT.fullmatch(e.entry):
        return f"entry {e.entry!r} is not a PTX identifier"
    if type(e.nparams) is not int or not 0 <= e.nparams <= MAX_PARAMS:
        return f"parameter count {e.nparams!r} is not in 0..{MAX_PARAMS}"
    if not _HEX16.fullmatch(e.cubin_fnv):
        return f"cubin hash {e.cubin_fnv!r} is not 16 lowercase hex digits"
    if not e.cubin.startswith("/"):
        return f"cubin path {e.cubin!r} is not absolute"
    if any(c in e.cubin for c in "\n\r\0"):
        return "cubin path contains a newline, carriage return or NUL"
    return None


def write_cubin(directory: Path, data: bytes) -> tuple[str, Path]:
    """(fnv, path) of `data` stored as `<directory>/<fnv>.cubin` (atomically; kept if already there)."""
    fnv = fnv_hex(data)
    path = Path(os.path.abspath(directory)) / f"{fnv}.cubin"
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return fnv, path
    except OSError:
        pass
    files.atomic_write(path, data, "cubin")
    return fnv, path


def write_plan(path: Path | str, entries: list[PlanEntry], comments: list[str] = ()) -> Path:
    """Write the plan atomically; returns its absolute path."""
    path = Path(os.path.abspath(path))
    files.atomic_write(path, plan_text(entries, comments).encode("utf-8"), "block-level plan")
    return path


def read_plan(path: Path | str, check: str = "format") -> Plan:
    """The plan at `path`, validated strictly; any problem is a one-line TallyError.

    check: "format" (the text only), "exists" (also: every cubin is a regular file),
    "hash" (also: every cubin's bytes have the FNV-1a-64 its lines name)."""
    if check not in ("format", "exists", "hash"):
        raise ValueError(f"check {check!r}")
    path = Path(os.path.abspath(path))
    where = f"block-level plan {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise TallyError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise TallyError(f"{where} is a directory") from None
    except OSError as exc:
        raise TallyError(f"{where} is unreadable: {exc.strerror or exc}") from None
    if len(data) > MAX_PLAN_BYTES:
        raise TallyError(f"{where} is larger than {MAX_PLAN_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TallyError(f"{where} is not UTF-8 text") from None
    if not text.endswith("\n"):
        raise TallyError(f"{where} is truncated (no newline at its end)")
    lines = text[:-1].split("\n")
    if lines[0] != HEADER:
        other = re.fullmatch(r"tally-blocksched-plan (\d{1,9})", lines[0])
        why = f"is of another format version ({lines[0]!r})" if other else "is not a tally block-level plan"
        raise TallyError(f"{where} {why}")
    entries: list[PlanEntry] = []
    comments: list[str] = []
    seen: set[tuple[str, str]] = set()
    paths: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        entry, why = _parse_line(line)
        if why is None and (entry.image, entry.entry) in seen:
            why = f"kernel {entry.entry} of image {entry.image} listed twice"
        if why is None and paths.setdefault(entry.cubin_fnv, entry.cubin) != entry.cubin:
            why = f"cubin {entry.cubin_fnv} is named by two paths"
        if why is not None:
            raise TallyError(f"{where}: line {number}: {why}")
        seen.add((entry.image, entry.entry))
        entries.append(entry)
    if check != "format":
        _check_cubins(where, entries, check == "hash")
    return Plan(str(path), entries, comments)


def _parse_line(line: str) -> tuple[PlanEntry | None, str | None]:
    if not line:
        return None, "empty line"
    if "\r" in line or "\0" in line:
        return None, "carriage return or NUL in the line"
    parts = line.split(" ", 5)
    if len(parts) != 6:
        return None, "expected 'slice <image fnv> <entry> <nparams> <cubin fnv> <cubin path>'"
    kind, image, entry, nparams, cubin_fnv, cubin = parts
    if kind != "slice":
        return None, f"unknown kind {kind[:40]!r} (expected 'slice')"
    if not _COUNT.fullmatch(nparams):
        return None, f"parameter count {nparams[:40]!r} is not a number"
    e = PlanEntry(image, entry, int(nparams), cubin_fnv, cubin)
    why = _check_entry(e)
    return (None, why) if why else (e, None)


def _check_cubins(where: str, entries: list[PlanEntry], verify_hash: bool) -> None:
    checked: dict[str, str] = {}
    for e in entries:
        if checked.get(e.cubin) == e.cubin_fnv:
            continue
        if e.cubin in checked:
            raise TallyError(f"{where}: cubin {e.cubin} is named with two hashes")
        try:
            if not Path(e.cubin).is_file():
                raise TallyError(f"{where}: cubin {e.cubin} of {e.entry} is missing "
                                 "(run `tally blocksched prepare --compile` again)")
            if verify_hash:
                actual = fnv_hex(Path(e.cubin).read_bytes())
                if actual != e.cubin_fnv:
                    raise TallyError(f"{where}: cubin {e.cubin} has FNV-1a-64 {actual}, the plan says "
                                     f"{e.cubin_fnv} (run `tally blocksched prepare --compile` again)")
        except OSError as exc:
            raise TallyError(f"{where}: cubin {e.cubin} is unreadable: {exc.strerror or exc}") from None
        checked[e.cubin] = e.cubin_fnv
