"""Candidate launch configurations of one (kernel, grid, block).

The paper's rules (DESIGN.md, "How the paper's implementation did it"):
candidates exist only for grids larger than the SM count; for blocks-per-SM
b = 1, 2, ... while b blocks' threads fit on an SM (and the kernel's occupancy
allows b resident blocks), the kernel is tried

* as preemptible PTB with w = SMs x b workers (`abi.worker_count`),
* as (non-preemptible) PTB with the same w,
* as slices of SMs x b blocks (one wave at that residency; `abi.slice_plan`),

plus, when the original kernel's duration is known, slices sized so that one
slice takes about the turnaround bound (a whole number of full-occupancy
waves, at least one). The original kernel is always a candidate.

All grid arithmetic is `tally.ptx.abi`'s: slice plans, worker counts, PTB
grids, waves. A configuration is named by a short key that survives a file
round trip: "original", "slice:<blocks per slice>", "ptb:<workers>",
"preemptible:<workers>".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tally.errors import TallyError
from tally.ptx import abi

ORIGINAL = "original"
MODES = ("slice", "ptb", "preemptible")
KINDS = (ORIGINAL, *MODES)

# Hardware limits of the GPUs tally targets (H100/H200: 2048 threads, 32 blocks per SM).
DEFAULT_MAX_THREADS_PER_SM = 2048
DEFAULT_MAX_BLOCKS_PER_SM = 32

_KEY = re.compile(r"(slice|ptb|preemptible):([1-9][0-9]{0,9})")


@dataclass(frozen=True, order=True)
class Candidate:
    """One launch configuration. `size` is blocks per slice (slice) or workers (ptb, preemptible)."""

    mode: str  # "original" | "slice" | "ptb" | "preemptible"
    size: int = 0

    def __post_init__(self):
        if self.mode not in KINDS:
            raise ValueError(f"unknown configuration mode {self.mode!r}")
        if (self.mode == ORIGINAL) != (self.size == 0) or self.size < 0:
            raise ValueError(f"bad size {self.size} for {self.mode}")

    @property
    def key(self) -> str:
        return ORIGINAL if self.mode == ORIGINAL else f"{self.mode}:{self.size}"

    def launches(self, grid: tuple[int, int, int]) -> int:
        """Kernel launches one original launch of `grid` becomes."""
        if self.mode == "slice":
            return len(abi.slice_plan(grid, self.size))
        return 1

    def slice_plan(self, grid: tuple[int, int, int]) -> list[abi.SliceLaunch]:
        if self.mode != "slice":
            raise ValueError(f"{self.key} is not a slice configuration")
        return abi.slice_plan(grid, self.size)

    def launch_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The launch grid of a PTB / preemptible configuration."""
        if self.mode not in ("ptb", "preemptible"):
            raise ValueError(f"{self.key} is not a PTB configuration")
        return abi.ptb_grid(grid, self.size)

    def waves(self, grid: tuple[int, int, int]) -> int:
        """Original blocks each worker runs (at most), for PTB modes."""
        return abi.estimated_waves(abi.total_blocks(grid), self.launch_grid(grid)[0])

    def describe(self, grid: tuple[int, int, int] | None = None) -> str:
        if self.mode == ORIGINAL:
            return ORIGINAL
        if self.mode == "slice":
            if grid is None:
                return f"slice of {self.size} blocks"
            return f"slice n={self.launches(grid)} ({self.size} blocks each)"
        return f"{self.mode} w={self.size}"


def parse_config(key: str) -> Candidate:
    """The Candidate a key names (raises TallyError for anything else)."""
    if key == ORIGINAL:
        return Candidate(ORIGINAL)
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise TallyError(f"not a configuration: {key!r} (expected original, slice:N, ptb:W or preemptible:W)")
    return Candidate(m.group(1), int(m.group(2)))


def _threads(block) -> int:
    dims = tuple(int(d) for d in block)
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(f"block must have 1 to 3 positive dimensions, got {block}")
    return math.prod(dims)


def blocks_per_sm_range(block, max_threads_per_sm: int = DEFAULT_MAX_THREADS_PER_SM,
                        max_blocks_per_sm: int = DEFAULT_MAX_BLOCKS_PER_SM,
                        occupancy: int | None = None) -> range:
    """b = 1, 2, ... while b blocks' threads fit on one SM, capped by the
    hardware's and (when known) the kernel's occupancy limit."""
    threads = _threads(block)
    limit = min(max_threads_per_sm // threads, max_blocks_per_sm)
    if occupancy is not None:
        limit = min(limit, occupancy)
    return range(1, max(0, limit) + 1)


def enumerate_candidates(grid, block, num_sms: int, *, occupancy: int | None = None,
                         max_threads_per_sm: int = DEFAULT_MAX_THREADS_PER_SM,
                         max_blocks_per_sm: int = DEFAULT_MAX_BLOCKS_PER_SM,
                         kernel_ns: float | None = None, bound_ns: float = 100_000,
                         modes: tuple[str, ...] = MODES) -> list[Candidate]:
    """The configurations to measure for a launch of `grid` x `block` on a GPU
    of `num_sms` SMs. `occupancy`: resident blocks per SM the kernel allows
    (cuOccupancyMaxActiveBlocksPerMultiprocessor), if known. `kernel_ns`: the
    original kernel's duration, if known (adds bound-targeted slices).
    `modes`: the transformations tally.ptx accepts for this kernel.
    Always starts with the original; no duplicates; deterministic order."""
    if num_sms < 1:
        raise ValueError("num_sms must be >= 1")
    total = abi.total_blocks(grid)
    out = [Candidate(ORIGINAL)]
    if total <= num_sms:
        return out  # one wave: nothing to gain (the paper's rule)
    per_sm = blocks_per_sm_range(block, max_threads_per_sm, max_blocks_per_sm, occupancy)
    seen = {out[0]}

    def add(candidate: Candidate) -> None:
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)

    for b in per_sm:
        workers = abi.worker_count(num_sms, b, grid)
        for mode in ("preemptible", "ptb"):
            if mode in modes:
                add(Candidate(mode, abi.ptb_grid(grid, workers)[0]))
        if "slice" in modes and workers < total:
            add(Candidate("slice", workers))
        if workers >= total:
            break  # more resident blocks than the grid has
    if "slice" in modes and kernel_ns and kernel_ns > 0 and len(per_sm):
        size = bound_targeted_slice(grid, num_sms, per_sm[-1], kernel_ns, bound_ns)
        if size < total:
            add(Candidate("slice", size))
    return out


def bound_targeted_slice(grid, num_sms: int, blocks_per_sm: int, kernel_ns: float, bound_ns: float) -> int:
    """Blocks per slice so that one slice takes about `bound_ns`: a whole number
    (>= 1) of waves of SMs x blocks_per_sm blocks, a wave lasting
    kernel_ns / waves of the original launch."""
    resident = abi.worker_count(num_sms, blocks_per_sm, grid)
    wave_ns = kernel_ns / abi.estimated_waves(abi.total_blocks(grid), resident)
    waves_per_slice = max(1, math.floor(bound_ns / wave_ns)) if wave_ns > 0 else 1
    return resident * waves_per_slice
