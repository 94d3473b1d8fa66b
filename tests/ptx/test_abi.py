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
    state = abi.new_state(1)
    assert len(state) == abi.state_size(1) == 24 and state == bytes(24)
    assert abi.state_size(132) == abi.STATE_HEADER_SIZE + 8 * 132
    with pytest.raises(ValueError):
        abi.state_size(0)
    assert abi.read_state(abi.new_state(4, 17, 1)) == abi.State(17, 1)
    assert len(abi.new_state(4, 17, 1)) == abi.state_size(4)
    assert abi.read_state(abi.new_state(1, 10)).finished((10, 1, 1))
    assert not abi.read_state(abi.new_state(1, 9)).finished((10, 1, 1))
    assert abi.read_state(abi.new_state(1, 14)).blocks_done((10, 1, 1)) == 10
    # every worker's two slots are its own, after the header, inside the State
    offsets = [abi.slot_offset(w, parity) for w in range(7) for parity in (0, 1)]
    assert len(set(offsets)) == len(offsets) and min(offsets) >= abi.STATE_HEADER_SIZE
    assert max(offsets) + 4 <= abi.state_size(7)
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


# ---------------------------------------------------------------- worker-loop simulation
# A small multi-threaded interpreter for the generated worker loop (prologue, loop
# top, epilogue) around a tiny body: several workers of a few threads each,
# interleaved at random, sharing one global memory; barriers block until every
# thread of the worker arrives. It checks the index broadcast through the State's
# per-worker slots: every original block runs exactly once on every thread, with
# its own ctaid, and every State access stays inside state_size(workers).

SIM_BODY = """\t.reg .pred %p<3>;
\tmov.u32 %r1, %ctaid.x;
\tmov.u32 %r2, %ctaid.y;
\tmov.u32 %r3, %tid.x;
\tadd.u32 %r0, %r1, %r2;
\tand.b32 %r0, %r0, 1;
\tsetp.eq.u32 %p1, %r0, 1;
\tsetp.eq.u32 %p2, %r3, 1;
\tand.pred %p1, %p1, %p2;
\t@%p1 ret;
\tbar.sync 0;
\tpmevent 1;"""
SIM_STATE = 0x1000


class Thread:
    def __init__(self, worker, tid):
        self.worker, self.tid, self.pc, self.regs, self.done, self.waiting = worker, tid, 0, {}, False, None


def simulate(mode, grid, workers, rng, retreat_at=None, memory=None, barrier=True):
    import random

    module = parse(MINI_SIM if barrier else MINI_SIM.replace("\tbar.sync 0;\n", ""))
    from tally.ptx.transform import transform_module

    text = transform_module(module, mode).text
    entry = parse(text).entry(abi.transformed_name("k", mode))
    program = [s for s in entry.statements if s.kind in ("instruction", "label")]
    labels = {s.label: i for i, s in enumerate(program) if s.kind == "label"}
    size = abi.state_size(workers)
    memory = memory if memory is not None else {SIM_STATE + offset: 0 for offset in range(0, size, 4)}
    params = dict(zip(abi.GRID_PARAMS, grid)) | {abi.STATE_PARAM: SIM_STATE}
    threads = [Thread(w, t) for w in range(workers) for t in range(SIM_THREADS)]
    log, slot_writes, steps = [], [], 0
    chooser = random.Random(rng)
    # uneven speeds: some threads lag far behind their worker's leader
    speed = {id(t): chooser.choice((1.0, 0.05, 0.002)) for t in threads}

    def value(thread, operand):
        operand = operand.strip()
        if re.fullmatch(r"-?\d+", operand):
            return int(operand) & 0xFFFFFFFFFFFFFFFF
        special = {"%tid.x": thread.tid, "%tid.y": 0, "%tid.z": 0, "%ctaid.x": thread.worker, "%ctaid.y": 0,
                   "%ctaid.z": 0, "%nctaid.x": workers, "%nctaid.y": 1, "%nctaid.z": 1}
        return special[operand] if operand in special else thread.regs[operand]

    def address(thread, operand):
        inner = operand.strip()[1:-1]
        if inner in params:
            return inner
        addr = value(thread, inner)
        assert SIM_STATE <= addr < SIM_STATE + size and addr % 4 == 0, f"access at {addr:#x} outside the State"
        return addr

    while True:
        live = [t for t in threads if not t.done]
        if not live:
            break
        steps += 1
        assert steps < 200_000, "no progress"
        if retreat_at is not None and steps == retreat_at:
            memory[SIM_STATE + abi.RETREAT_OFFSET] = 1
        runnable = [t for t in live if t.waiting is None]
        if not runnable:  # every live thread waits at a barrier: release the complete ones
            released = False
            for worker in range(workers):
                group = [t for t in threads if t.worker == worker and not t.done]
                if group and all(t.waiting is not None for t in group):
                    kinds = {t.waiting[0] for t in group}
                    assert len(kinds) == 1, f"threads of worker {worker} wait at different barriers {kinds}"
                    any_working = any(t.waiting[2] for t in group)
                    for t in group:
                        if t.waiting[1]:
                            t.regs[t.waiting[1]] = any_working
                        t.waiting = None
                    released = True
            assert released, "deadlock"
            continue
        thread = chooser.choices(runnable, weights=[speed[id(t)] for t in runnable])[0]
        statement = program[thread.pc]
        thread.pc += 1
        if statement.kind == "label":
            continue
        if statement.predicate:
            negate = statement.predicate.startswith("!")
            if bool(thread.regs[statement.predicate.lstrip("!")]) == negate:
                continue
        op, ops = statement.opcode, statement.operand_list()
        regs = thread.regs
        if op in ("exit",):
            thread.done = True
        elif op == "bra":
            thread.pc = labels[ops[0]]
        elif op == "pmevent":
            log.append((thread.worker, thread.tid, regs["%r1"], regs["%r2"]))
        elif op == "barrier.sync":
            thread.waiting = ("sync " + ops[0], None, False)
        elif op == "barrier.red.or.pred":
            thread.waiting = ("red " + ops[1], ops[0], bool(regs[ops[2]]))
        elif op in ("ld.param.u32", "ld.param.u64"):
            regs[ops[0]] = params[address(thread, ops[1])]
        elif op.startswith("cvta.to.global"):
            regs[ops[0]] = value(thread, ops[1])
        elif op in ("mov.u32",):
            regs[ops[0]] = value(thread, ops[1])
        elif op in ("add.u32", "add.u64"):
            regs[ops[0]] = (value(thread, ops[1]) + value(thread, ops[2])) & (0xFFFFFFFF if op.endswith("32") else 2**64 - 1)
        elif op == "sub.u32":
            regs[ops[0]] = (value(thread, ops[1]) - value(thread, ops[2])) & 0xFFFFFFFF
        elif op in ("mul.lo.u32", "mul.wide.u32"):
            regs[ops[0]] = value(thread, ops[1]) * value(thread, ops[2]) & (0xFFFFFFFF if "lo" in op else 2**64 - 1)
        elif op == "mad.lo.u32":
            regs[ops[0]] = (value(thread, ops[1]) * value(thread, ops[2]) + value(thread, ops[3])) & 0xFFFFFFFF
        elif op == "div.u32":
            regs[ops[0]] = value(thread, ops[1]) // value(thread, ops[2])
        elif op in ("or.b32", "and.b32", "xor.b32"):
            a, b = value(thread, ops[1]), value(thread, ops[2])
            regs[ops[0]] = {"or": a | b, "and": a & b, "xor": a ^ b}[op[:-4]]
        elif op == "and.pred":
            regs[ops[0]] = bool(regs[ops[1]]) and bool(regs[ops[2]])
        elif op.startswith("setp."):
            a, b = value(thread, ops[1]), value(thread, ops[2])
            regs[ops[0]] = {"eq": a == b, "ne": a != b, "ge": a >= b}[op.split(".")[1]]
        elif op == "atom.global.add.u32":
            addr = address(thread, ops[1])
            assert addr == SIM_STATE + abi.NEXT_INDEX_OFFSET
            regs[ops[0]] = memory[addr]
            memory[addr] = (memory[addr] + value(thread, ops[2])) & 0xFFFFFFFF
        elif op.startswith("ld.") and ".global." in op:
            regs[ops[0]] = memory[address(thread, ops[1])]
        elif op.startswith("st.") and ".global." in op:
            addr = address(thread, ops[0])
            assert thread.tid == 0, "only the leader publishes"
            slot_writes.append((thread.worker, addr - SIM_STATE))
            memory[addr] = value(thread, ops[1])
        else:
            raise AssertionError(f"simulator does not know {statement.text}")
    for worker, offset in slot_writes:
        assert offset in (abi.slot_offset(worker, 0), abi.slot_offset(worker, 1)), (worker, offset)
    return log, memory


SIM_THREADS = 3
MINI_SIM = (".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k()\n{\n\t.reg .b32 %r<4>;\n"
            + SIM_BODY + "\n\tret;\n}\n")


def expected_log(blocks):
    runs = []
    for linear in blocks:
        x, y, _ = abi.original_ctaid(linear, SIM_GRID_SHAPE[0])
        for tid in range(SIM_THREADS):
            if not ((x + y) % 2 == 1 and tid == 1):
                runs.append((tid, x, y))
    return sorted(runs)


SIM_GRID_SHAPE = [None]


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 7), st.integers(1, 4)), st.integers(1, 5), st.integers(0, 2**32 - 1), st.booleans())
def test_worker_loop_runs_every_block_once_through_the_state_slots(grid2, workers, seed, barrier):
    grid = (grid2[0], grid2[1], 1)
    SIM_GRID_SHAPE[0] = grid
    total = abi.total_blocks(grid)
    workers = min(workers, total)
    log, memory = simulate("ptb", grid, workers, seed, barrier=barrier)
    assert sorted((tid, x, y) for _, tid, x, y in log) == expected_log(range(total))
    assert memory[SIM_STATE] >= total


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 7), st.integers(1, 4)), st.integers(1, 5), st.integers(0, 2**32 - 1),
       st.integers(1, 3000), st.booleans())
def test_preempted_worker_loop_resumes_without_losing_or_repeating_blocks(grid2, workers, seed, retreat_at, barrier):
    grid = (grid2[0], grid2[1], 1)
    SIM_GRID_SHAPE[0] = grid
    total = abi.total_blocks(grid)
    workers = min(workers, total)
    log, memory = simulate("preemptible", grid, workers, seed, retreat_at=retreat_at, barrier=barrier)
    done = memory[SIM_STATE]
    assert sorted((tid, x, y) for _, tid, x, y in log) == expected_log(range(min(done, total)))
    if done < total:  # resume: clear retreat, relaunch with the same State (and fewer workers)
        memory[SIM_STATE + abi.RETREAT_OFFSET] = 0
        more, memory = simulate("preemptible", grid, max(1, workers - 1), seed + 1, memory=memory,
                                barrier=barrier)
        assert sorted((tid, x, y) for _, tid, x, y in log + more) == expected_log(range(total))
