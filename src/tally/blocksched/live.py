"""What the agent did with the block-level plan in a live run: per kernel, how its launches ran
(as slices, or whole) and why.

The agent writes this into each process's stats file at exit, as the "blocksched" object
(agent/blocksched.c, `tally_blocksched_write_stats`). `tally run --block-level` without
`--stats-dir` puts those files in the program's live directory,
`<cache_dir>/blocksched/live/<name>-<hash>/` (named like its profile file), and empties it first:
`tally blocksched show -- CMD` reports the program's last block-level run.

A stats file is input like any other: one that does not read, or whose "blocksched" object has a
value out of place, is skipped with one warning, never half-trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tally.blocksched import _files
from tally.errors import TallyError
from tally.paths import cache_dir

MAX_STATS_BYTES = 4 << 20
# the agent's per-kernel counters, in the order of its stats file
COUNTS = ("sliced_launches", "slices", "whole_launches", "waves_per_slice", "wave_blocks", "wave_ns", "budget_ns")


def live_dir(command: list[str], env_path: str | None = None) -> Path:
    """Where `tally run --block-level` keeps the stats files of the program's last run."""
    from tally.profiles import profile_path

    return cache_dir() / "blocksched" / "live" / profile_path(command, env_path).stem


def start_run(directory: Path) -> None:
    """Make `directory` the stats directory of a new run: created, with the last run's files removed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("stats-*.json"):
            old.unlink(missing_ok=True)
    except OSError as exc:
        raise TallyError(f"cannot prepare the block-level stats directory {directory}: "
                         f"{exc.strerror or exc}") from None


@dataclass
class LiveKernel:
    """One planned kernel's launches in a run, summed over its processes."""

    entry: str
    image: str  # FNV-1a 64 of the code image it was loaded from, hex
    sliced_launches: int = 0
    slices: int = 0
    whole_launches: int = 0
    waves_per_slice: int = 0  # the last sliced launch's configuration ...
    wave_blocks: int = 0
    wave_ns: int = 0          # ... and what it was sized from (0: no wave time known yet)
    budget_ns: int = 0
    usable: bool = True
    reason: str = ""          # why it is unusable, or why its last whole launch ran whole

    def describe(self) -> str:
        """'sliced ... ; whole ...: reason' in one line."""
        parts = []
        if not self.usable:
            parts.append(f"not sliced: {self.reason}")
        if self.sliced_launches:
            each = self.slices / self.sliced_launches
            config = (f"sliced {self.sliced_launches} launch(es), {each:.1f} slices each, last of "
                      f"{self.waves_per_slice} wave(s) = {self.waves_per_slice * self.wave_blocks} blocks")
            if self.wave_ns:
                config += (f" (budget {self.budget_ns / 1e3:.0f} us / {self.wave_ns / 1e3:.1f} us a wave)")
            else:
                config += " (no wave time known yet: one wave a slice)"
            parts.append(config)
        if self.whole_launches:
            parts.append(f"{self.whole_launches} whole" + (f": {self.reason}" if self.usable and self.reason else ""))
        return "; ".join(parts) or "never launched"


def parse(data: bytes, source: str) -> list[LiveKernel] | None:
    """The planned kernels of one stats file (None when it ran without a plan); TallyError when
    it is not a stats file or its "blocksched" object does not read."""
    if len(data) > MAX_STATS_BYTES:
        raise TallyError(f"{source}: larger than {MAX_STATS_BYTES >> 20} MiB, not a stats file")
    try:
        stats = _files.strict_json(data)
    except (ValueError, RecursionError) as exc:
        raise TallyError(f"{source}: not a stats file ({exc})") from None
    if not isinstance(stats, dict):
        raise TallyError(f"{source}: not a stats file (not a JSON object)")
    block = stats.get("blocksched")
    if block is None:
        return None
    kernels = block.get("kernels") if isinstance(block, dict) else None
    if not isinstance(kernels, list):
        raise TallyError(f"{source}: its \"blocksched\" object has no kernel list")
    out = []
    for i, k in enumerate(kernels):
        where = f"{source}: kernel {i}"
        if not isinstance(k, dict) or not isinstance(k.get("entry"), str) or not k["entry"]:
            raise TallyError(f"{where} has no entry name")
        if not isinstance(k.get("image"), str) or not isinstance(k.get("reason"), str):
            raise TallyError(f"{where} ({k['entry']}) has no image or reason")
        if not isinstance(k.get("usable"), bool):
            raise TallyError(f"{where} ({k['entry']}): usable is not true or false")
        counts = {}
        for name in COUNTS:
            value = k.get(name, 0)  # agents before the configuration fields wrote only the first three
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TallyError(f"{where} ({k['entry']}): {name} is not a count")
            counts[name] = value
        out.append(LiveKernel(k["entry"], k["image"], usable=k["usable"], reason=k["reason"], **counts))
    return out


def merge(runs: list[list[LiveKernel]]) -> list[LiveKernel]:
    """One record per (image, entry): counts summed; the configuration and reasons of the
    last file that has them (files in the order given)."""
    merged: dict[tuple[str, str], LiveKernel] = {}
    for kernels in runs:
        for k in kernels:
            m = merged.setdefault((k.image, k.entry), LiveKernel(k.entry, k.image))
            m.sliced_launches += k.sliced_launches
            m.slices += k.slices
            m.whole_launches += k.whole_launches
            if k.sliced_launches:
                m.waves_per_slice, m.wave_blocks = k.waves_per_slice, k.wave_blocks
                m.wave_ns, m.budget_ns = k.wave_ns, k.budget_ns
            if k.reason:
                m.reason = k.reason
            m.usable = m.usable and k.usable
    return sorted(merged.values(), key=lambda k: (-(k.sliced_launches + k.whole_launches), k.entry))


def read(path: Path) -> tuple[list[LiveKernel], int]:
    """The merged records of a stats file or of every stats-*.json in a directory (oldest first),
    and how many files had a plan. In a directory, a file that does not read is skipped with one
    warning; a single file that does not read is a TallyError."""
    path = Path(path)
    single = not path.is_dir()
    files = [path] if single else sorted(path.glob("stats-*.json"), key=_mtime)
    runs = []
    for f in files:
        try:
            data = _files.read_limited(f, MAX_STATS_BYTES)
            if data is None:
                raise TallyError(f"no stats file {f}")
            kernels = parse(data, str(f))
        except (OSError, TallyError) as exc:
            message = f"cannot read {f}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
            if single:
                raise TallyError(message) from None
            _files.warn_once(f"live:{f}", f"{message}; ignored")
            continue
        if kernels is not None:
            runs.append(kernels)
    return merge(runs), len(runs)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
