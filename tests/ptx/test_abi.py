"""The index arithmetic of slices and worker loops: host helpers (abi) and the
PTX the transformer emits, executed by a tiny interpreter, must agree."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from tally.ptx import abi
from tally.ptx.parse import parse
from tally.ptx.transform import _prologue, _unlinearize

grids = st.tuples(st.integers(1, 300), st.integers(1, 40), st.integers(1, 12))


@given(grids)
def test_original_ctaid_is_the_inverse_of_linearization(grid):
    gx, gy, gz = grid
    total = abi.total_blocks(grid)
    seen = set()
    for linear in range(0, total, max(1, total // 200)):
        x, y, z = abi.original_ctaid(linear, grid)
        assert 0 <= x < gx and 0 <= y < gy and 0 <= z < gz
        assert x + gx * (y + gy * z) == linear
        seen.add((x, y, z))
    assert len(seen) == len(range(0, total, max(1, total // 200)))


@settings(deadline=None)
@given(grids, st.integers(1, 5000))
def test_slice_plan_covers_every_block_once_in_order(grid, size):
    plan = abi.slice_plan(grid, size)
    covered = []
    for launch in plan:
        assert launch.grid == (launch.blocks, 1, 1)
        assert 1 <= launch.blocks <= size
        covered.extend(abi.slice_block_linear((x, 0, 0), launch.grid, launch.block_offset) for x in range(launch.blocks))
    assert covered == list(range(abi.total_blocks(grid)))


@given(grids, st.lists(st.integers(1, 700), min_size=1, max_size=50))
def test_slice_plan_sizes(grid, sizes):
    total = abi.total_blocks(grid)
    if sum(sizes) < total:
        with pytest.raises(ValueError):
            abi.slice_plan_sizes(grid, sizes)
        return
    plan = abi.slice_plan_sizes(grid, sizes)
    assert plan[0].block_offset == 0
    assert sum(launch.blocks for launch in plan) == total
    for previous, launch in zip(plan, plan[1:]):
        assert launch.block_offset == previous.block_offset + previous.blocks


@given(grids, st.integers(1, 100_000), st.integers(1, 132), st.integers(1, 8))
def test_ptb_grid_and_worker_count(grid, workers, sms, per_sm):
    total = abi.total_blocks(grid)
    assert abi.ptb_grid(grid, workers) == (min(workers, total), 1, 1)
    assert abi.worker_count(sms, per_sm, grid) == min(sms * per_sm, total)


def test_limits_and_state_layout():
    with pytest.raises(ValueError):
        abi.total_blocks((2**31 - 1, 65535, 2))
    with pytest.raises(ValueError):
        abi.total_blocks((0, 1, 1))
    state = abi.new_state()
    assert len(state) == abi.STATE_SIZE and state == bytes(16)
    assert abi.read_state(abi.new_state(17, 1)) == abi.State(17, 1)
    assert abi.read_state(abi.new_state(10)).finished((10, 1, 1))
    assert not abi.read_state(abi.new_state(9)).finished((10, 1, 1))
    assert abi.read_state(abi.new_state(14)).blocks_done((10, 1, 1)) == 10
    assert [name for name, _ in abi.appended_params("ptb", 32)][-1] == abi.STATE_PARAM
    assert abi.appended_params("preemptible", 32)[-1][1] == ".u32"
    assert abi.slice_args((3, 4, 5), 7) == [("u32", 3), ("u32", 4), ("u32", 5), ("u32", 7)]


# ---------------------------------------------------------------- PTX interpreter
MASK = 0xFFFFFFFF


def run_straight_line(lines, registers, params):
    """Execute the u32 arithmetic the prologues use; returns 'exit' or None."""
    for line in lines:
        line = line.strip().rstrip(";")
        if not line:
            continue
        predicate = None
        if line.startswith("@"):
            predicate, line = line.split(None, 1)
        if predicate and not registers[predicate[1:]]:
            continue
        opcode, _, rest = line.partition(" ")
        ops = [o.strip() for o in rest.split(",")] if rest else []

        def value(operand):
            if re.fullmatch(r"-?\d+", operand):
                return int(operand) & MASK
            return registers[operand]

        if opcode == "exit":
            return "exit"
        if opcode == "ld.param.u32":
            registers[ops[0]] = params[ops[1].strip("[]")]
        elif opcode == "mov.u32":
            registers[ops[0]] = value(ops[1])
        elif opcode == "mad.lo.u32":
            registers[ops[0]] = (value(ops[1]) * value(ops[2]) + value(ops[3])) & MASK
        elif opcode == "mul.lo.u32":
            registers[ops[0]] = (value(ops[1]) * value(ops[2])) & MASK
        elif opcode == "add.u32":
            registers[ops[0]] = (value(ops[1]) + value(ops[2])) & MASK
        elif opcode == "sub.u32":
            registers[ops[0]] = (value(ops[1]) - value(ops[2])) & MASK
        elif opcode == "div.u32":
            registers[ops[0]] = value(ops[1]) // value(ops[2])
        elif opcode == "setp.ge.u32":
            registers[ops[0]] = value(ops[1]) >= value(ops[2])
        else:
            raise AssertionError(f"interpreter does not know {opcode}")
    return None


MODULE = parse(".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k()\n{\n\tret;\n}\n")


@settings(max_examples=300, deadline=None)
@given(grids, st.data())
def test_slice_prologue_gives_every_block_its_original_ids(grid, data):
    """Launch a random slice shape at a random offset; every block that does not
    exit must see exactly its original %ctaid, and the exits are exactly the overhang."""
    total = abi.total_blocks(grid)
    offset = data.draw(st.integers(0, total - 1))
    slice_grid = data.draw(st.tuples(st.integers(1, 64), st.integers(1, 8), st.integers(1, 4)))
    block = data.draw(st.tuples(st.integers(0, slice_grid[0] - 1), st.integers(0, slice_grid[1] - 1),
                                st.integers(0, slice_grid[2] - 1)))
    lines = _prologue(MODULE, "slice", False).splitlines()
    registers = {"%ctaid.x": block[0], "%ctaid.y": block[1], "%ctaid.z": block[2],
                 "%nctaid.x": slice_grid[0], "%nctaid.y": slice_grid[1], "%nctaid.z": slice_grid[2]}
    params = dict(zip(abi.GRID_PARAMS, grid)) | {abi.BLOCK_OFFSET_PARAM: offset}
    outcome = run_straight_line(lines, registers, params)
    linear = abi.slice_block_linear(block, slice_grid, offset)
    if linear >= total:
        assert outcome == "exit"
        return
    assert outcome is None
    ctaid = tuple(registers[f"%__tally_ctaid_{axis}"] for axis in "xyz")
    assert ctaid == abi.original_ctaid(linear, grid)
    assert tuple(registers[f"%__tally_nctaid_{axis}"] for axis in "xyz") == grid


@given(grids, st.data())
def test_worker_loop_unlinearize_matches_host(grid, data):
    index = data.draw(st.integers(0, abi.total_blocks(grid) - 1))
    registers = {"%__tally_index": index, "%__tally_nctaid_x": grid[0], "%__tally_nctaid_y": grid[1]}
    assert run_straight_line(_unlinearize(), registers, {}) is None
    assert tuple(registers[f"%__tally_ctaid_{axis}"] for axis in "xyz") == abi.original_ctaid(index, grid)
