"""The launch ABI of transformed entries, shared by the transformer and host-side launchers.

Every transformed entry keeps the original parameters, in order, and appends
the parameters below. Grid dimensions are those of the *original* launch.

slice   (entry `<name>__tally_slice`)
    u32 grid_x, u32 grid_y, u32 grid_z   original grid
    u32 block_offset                     linear index of the slice's first block
  Launch any grid shape; the block with linear index
  L = ctaid.x + nctaid.x * (ctaid.y + nctaid.y * ctaid.z) of the slice runs
  original block `block_offset + L` (linear, x fastest), seeing exactly its
  original %ctaid and %nctaid; blocks past the end of the original grid exit.

ptb     (entry `<name>__tally_ptb`)
preemptible (entry `<name>__tally_preemptible`)
    u32 grid_x, u32 grid_y, u32 grid_z   original grid
    u64 state  (u32 for .address_size 32) global address of a State (below)
  Launch with grid (workers, 1, 1) and the original block shape and dynamic
  shared memory. Each worker's thread (0,0,0) takes the next original block
  index with atom.global.add on State.next_index, publishes it to its block
  through the worker's slot in the State (global memory), and the block runs
  that original block; workers exit when the index reaches
  grid_x*grid_y*grid_z. Blocks are handed out in increasing linear order
  (x fastest).

State (state_size(workers) = 16 + 8 * workers bytes, 4-byte aligned, device memory):
    offset 0       u32 next_index     the next original block to hand out
    offset 4       u32 retreat        preemptible only: non-zero asks workers to exit
    offset 8       u32 reserved[2]    zero
    offset 16+8*w  u32 slot[w][2]     worker w's double-buffered index broadcast (scratch)
  Worker w is the launch block with linear index w. The State must have a slot
  for every launched worker (size it for the largest worker count launched
  with it, e.g. when a preempted launch is resumed with more workers). The
  slots need no initial value; zero the whole State for a fresh launch.
  A fresh launch needs next_index = 0 and retreat = 0. The preemptible worker
  reads `retreat` (ld.volatile) before each atomic; when it is set the worker
  exits without taking an index, so after the kernel has ended every block
  below next_index has run exactly once and none at or above it has started.
  To resume: clear `retreat` and launch again with the same State. The launch
  finished the grid when next_index >= total blocks (workers that find the
  grid exhausted each consume one index past the end).

Limits: total blocks < 2**32 - 1 (0xFFFFFFFF is the in-kernel "preempted"
sentinel). The transformed entries declare no shared memory of their own: the
kernel's shared-memory layout (static and dynamic) is exactly the original's.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

ENTRY_SUFFIX = {"slice": "__tally_slice", "ptb": "__tally_ptb", "preemptible": "__tally_preemptible"}

GRID_PARAMS = ("__tally_grid_x", "__tally_grid_y", "__tally_grid_z")
BLOCK_OFFSET_PARAM = "__tally_block_offset"
STATE_PARAM = "__tally_state"

STATE_HEADER_SIZE = 16
NEXT_INDEX_OFFSET = 0
RETREAT_OFFSET = 4
SLOTS_OFFSET = STATE_HEADER_SIZE  # worker w's slot pair is at SLOTS_OFFSET + SLOT_STRIDE * w
SLOT_STRIDE = 8
PREEMPTED_SENTINEL = 0xFFFFFFFF
MAX_TOTAL_BLOCKS = PREEMPTED_SENTINEL - 1
MAX_WORKERS = (1 << 31) - 1  # a launch grid's x dimension


def state_size(workers: int) -> int:
    """Bytes of the State for launches of up to `workers` worker blocks."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")
    return SLOTS_OFFSET + SLOT_STRIDE * workers


def slot_offset(worker: int, parity: int) -> int:
    """Byte offset in the State of the slot worker `worker` uses for blocks of `parity` (0, 1)."""
    return SLOTS_OFFSET + SLOT_STRIDE * worker + 4 * parity


def appended_params(mode: str, address_size: int = 64) -> list[tuple[str, str]]:
    """(name, PTX type) of the parameters a transformed entry appends, in order."""
    grid = [(name, ".u32") for name in GRID_PARAMS]
    if mode == "slice":
        return grid + [(BLOCK_OFFSET_PARAM, ".u32")]
    if mode in ("ptb", "preemptible"):
        return grid + [(STATE_PARAM, ".u64" if address_size == 64 else ".u32")]
    raise ValueError(f"unknown mode {mode!r}")


def transformed_name(entry_name: str, mode: str) -> str:
    return entry_name + ENTRY_SUFFIX[mode]


def total_blocks(grid: tuple[int, int, int]) -> int:
    gx, gy, gz = _grid3(grid)
    total = gx * gy * gz
    if total > MAX_TOTAL_BLOCKS:
        raise ValueError(f"grid {grid} has {total} blocks; transformed launches support at most {MAX_TOTAL_BLOCKS}")
    return total


@dataclass(frozen=True)
class SliceLaunch:
    grid: tuple[int, int, int]  # the slice's launch grid
    block_offset: int  # linear index of its first original block
    blocks: int  # number of original blocks it runs

    def appended_args(self, original_grid: tuple[int, int, int]) -> list[tuple[str, int]]:
        return slice_args(original_grid, self.block_offset)


def slice_plan(grid: tuple[int, int, int], blocks_per_slice: int) -> list[SliceLaunch]:
    """Cut the original grid into consecutive slices of `blocks_per_slice`
    blocks (the last one trimmed), each launched as a (n, 1, 1) grid."""
    if blocks_per_slice < 1:
        raise ValueError("blocks_per_slice must be >= 1")
    total = total_blocks(grid)
    plan, offset = [], 0
    while offset < total:
        count = min(blocks_per_slice, total - offset)
        plan.append(SliceLaunch((count, 1, 1), offset, count))
        offset += count
    return plan


def slice_plan_sizes(grid: tuple[int, int, int], sizes: list[int]) -> list[SliceLaunch]:
    """Slices of the given sizes in order (the last one trimmed; extra sizes ignored)."""
    total = total_blocks(grid)
    plan, offset = [], 0
    for size in sizes:
        if offset >= total:
            break
        if size < 1:
            raise ValueError("slice sizes must be >= 1")
        count = min(size, total - offset)
        plan.append(SliceLaunch((count, 1, 1), offset, count))
        offset += count
    if offset < total:
        raise ValueError(f"slice sizes cover {offset} of {total} blocks")
    return plan


def slice_args(grid: tuple[int, int, int], block_offset: int) -> list[tuple[str, int]]:
    gx, gy, gz = _grid3(grid)
    return [("u32", gx), ("u32", gy), ("u32", gz), ("u32", block_offset)]


def ptb_args(grid: tuple[int, int, int], state_address: int, address_size: int = 64) -> list[tuple[str, int]]:
    gx, gy, gz = _grid3(grid)
    return [("u32", gx), ("u32", gy), ("u32", gz), ("u64" if address_size == 64 else "u32", state_address)]


def ptb_grid(grid: tuple[int, int, int], workers: int) -> tuple[int, int, int]:
    """Launch grid of a PTB launch: never more workers than original blocks."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    return (max(1, min(workers, total_blocks(grid))), 1, 1)


def worker_count(num_sms: int, blocks_per_sm: int, grid: tuple[int, int, int]) -> int:
    """Workers for `blocks_per_sm` resident blocks on every SM, capped by the grid size."""
    return max(1, min(num_sms * blocks_per_sm, total_blocks(grid)))


def original_ctaid(linear: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The %ctaid of original block `linear` (x fastest) - the arithmetic the kernels do."""
    gx, gy, _ = _grid3(grid)
    return (linear % gx, (linear // gx) % gy, linear // (gx * gy))


def slice_block_linear(ctaid: tuple[int, int, int], slice_grid: tuple[int, int, int], block_offset: int) -> int:
    """The original linear block a slice block runs - the arithmetic the slice prologue does (mod 2**32)."""
    sx, sy, _ = _grid3(slice_grid)
    x, y, z = ctaid
    return (block_offset + x + sx * (y + sy * z)) % (1 << 32)


def new_state(workers: int, next_index: int = 0, retreat: int = 0) -> bytes:
    """A State for launches of up to `workers` workers (slots zeroed)."""
    return struct.pack("<IIII", next_index, retreat, 0, 0) + bytes(state_size(workers) - STATE_HEADER_SIZE)


@dataclass(frozen=True)
class State:
    next_index: int
    retreat: int

    def finished(self, grid: tuple[int, int, int]) -> bool:
        return self.next_index >= total_blocks(grid)

    def blocks_done(self, grid: tuple[int, int, int]) -> int:
        return min(self.next_index, total_blocks(grid))


def read_state(data: bytes) -> State:
    next_index, retreat, _, _ = struct.unpack("<IIII", bytes(data[:STATE_HEADER_SIZE]))
    return State(next_index, retreat)


def _grid3(grid) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in grid) + (1,) * (3 - len(tuple(grid)))
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise ValueError(f"grid must have 1 to 3 positive dimensions, got {grid}")
    return dims  # type: ignore[return-value]


def estimated_waves(total: int, workers: int) -> int:
    return math.ceil(total / max(1, workers))
