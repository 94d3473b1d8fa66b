"""Candidate enumeration: the paper's rules, and every candidate covers the grid exactly (tally.ptx.abi)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from tally.blocksched.candidates import (Candidate, blocks_per_sm_range, bound_targeted_slice,
                                         enumerate_candidates, parse_config)
from tally.errors import TallyError
from tally.ptx import abi


def test_paper_example():
    keys = [c.key for c in enumerate_candidates((4096, 1, 1), (256, 1, 1), 132)]
    assert keys[0] == "original"
    # 256 threads: up to 8 blocks per SM
    assert [k for k in keys if k.startswith("preemptible")] == [f"preemptible:{132 * b}" for b in range(1, 9)]
    assert [k for k in keys if k.startswith("slice")] == [f"slice:{132 * b}" for b in range(1, 9)]
    assert [k for k in keys if k.startswith("ptb")] == [f"ptb:{132 * b}" for b in range(1, 9)]


def test_small_grids_keep_the_original_only():
    assert enumerate_candidates((132, 1, 1), (1024, 1, 1), 132) == [Candidate("original")]
    assert enumerate_candidates((11, 12, 1), (32, 1, 1), 132) == [Candidate("original")]


def test_occupancy_and_modes_limit_candidates():
    keys = [c.key for c in enumerate_candidates((10000, 1, 1), (128, 1, 1), 132, occupancy=2, modes=("preemptible",))]
    assert keys == ["original", "preemptible:132", "preemptible:264"]
    assert list(blocks_per_sm_range((1024, 1, 1))) == [1, 2]
    assert list(blocks_per_sm_range((32, 1, 1))) == list(range(1, 33))  # the hardware's 32 blocks per SM
    assert list(blocks_per_sm_range((1024, 4, 1))) == []  # does not fit at all


def test_workers_never_exceed_the_grid():
    keys = [c.key for c in enumerate_candidates((300, 1, 1), (64, 1, 1), 132)]
    assert keys == ["original", "preemptible:132", "ptb:132", "slice:132", "preemptible:264", "ptb:264", "slice:264",
                    "preemptible:300", "ptb:300"]


def test_bound_targeted_slices():
    # 1 ms over 32 waves of 132 blocks (8 per SM: 1056 resident -> 4 waves of 250 us): a wave is over the bound
    assert bound_targeted_slice((4096, 1, 1), 132, 8, 1e6, 1e5) == 1056
    # 40 us waves: two per 100 us slice
    assert bound_targeted_slice((42240, 1, 1), 132, 8, 40e3 * 40, 1e5) == 2112
    keys = [c.key for c in enumerate_candidates((42240, 1, 1), (256, 1, 1), 132, kernel_ns=40e3 * 40)]
    assert keys[-1] == "slice:2112"


def test_keys_round_trip_and_reject_junk():
    for c in enumerate_candidates((4096, 2, 1), (128, 1, 1), 132, kernel_ns=5e6):
        assert parse_config(c.key) == c
    for bad in ("", "slice", "slice:0", "slice:-1", "ptb:01", "Original", "preemptible:1e3", None, 7):
        with pytest.raises(TallyError):
            parse_config(bad)


grids = st.tuples(st.integers(1, 70), st.integers(1, 9), st.integers(1, 4))
blocks = st.tuples(st.sampled_from([1, 32, 64, 96, 128, 256, 512, 1024]), st.sampled_from([1, 2]), st.just(1))


@settings(max_examples=200, deadline=None)
@given(grids, blocks, st.integers(1, 40), st.one_of(st.none(), st.integers(1, 40)),
       st.one_of(st.none(), st.floats(1e3, 1e7)), st.floats(1e3, 1e6))
def test_every_candidate_covers_the_grid_exactly(grid, block, sms, occupancy, kernel_ns, bound_ns):
    found = enumerate_candidates(grid, block, sms, occupancy=occupancy, kernel_ns=kernel_ns, bound_ns=bound_ns)
    total = abi.total_blocks(grid)
    threads = math.prod(block)
    assert found[0] == Candidate("original") and len(set(found)) == len(found)
    if total <= sms:
        assert found == [Candidate("original")]
    for c in found[1:]:
        assert parse_config(c.key) == c
        if c.mode == "slice":
            assert c.size < total
            covered = []
            for launch in c.slice_plan(grid):
                assert launch.grid[0] <= c.size
                for x in range(launch.grid[0]):
                    covered.append(abi.slice_block_linear((x, 0, 0), launch.grid, launch.block_offset))
            assert covered == list(range(total))  # each original block once, in order
            assert c.launches(grid) == math.ceil(total / c.size)
        else:
            workers = c.launch_grid(grid)[0]
            assert workers == c.size <= total
            # w = SMs x blocks-per-SM for a b whose blocks fit (or the whole grid)
            b = math.ceil(workers / sms)
            assert workers == abi.worker_count(sms, b, grid)
            assert b * threads <= 2048 and b <= 32 and (occupancy is None or b <= occupancy)
            # dynamic hand-out: every worker takes blocks until the grid is done -> waves x workers >= total
            assert c.waves(grid) * workers >= total > (c.waves(grid) - 1) * workers
            assert [abi.original_ctaid(i, grid) for i in range(total)] == [
                (x, y, z) for z in range(grid[2]) for y in range(grid[1]) for x in range(grid[0])]
