"""Slice, PTB and preemptible-PTB transformations of one entry into a new entry.

The new entry is the original header (renamed, parameters appended per
`tally.ptx.abi`) and the original body with a generated prologue, `%ctaid` /
`%nctaid` reads replaced by registers holding the original block's values, and
(for the worker loops) `ret`/`exit` and block barriers rerouted. It is
inserted right after the original entry; the rest of the module is untouched.

Worker loop (ptb, preemptible), per worker block:

    prologue:     slot = &State.slots[worker]      -- worker = the launch block's linear index
    next_block:   leader (tid 0,0,0): [preemptible: if retreat is set, index = SENTINEL]
                  else index = atomicAdd(next_index, 1); store index in slot[parity] (global)
                  barrier.sync 1                 -- every thread of the worker
                  index = slot[parity]; parity ^= 1
                  if index >= total: exit        -- uniform: all threads read the same index
                  ctaid = unlinearize(index); working = true
                  <original body>                -- ret/exit -> bra thread_done
    thread_done:  working = false
    sync:         barrier.red.or.pred any, 0, working   -- (only if the body has barriers)
                  if !any: bra block_done               -- every thread has finished the block
                  if !working: bra sync                 -- finished threads keep joining barriers
                  bra resume_<site>                     -- working threads continue after their barrier
    block_done:   [cp.async.wait_all] [cp.async.bulk.wait_group 0] [wgmma.wait_group 0]
                  bra next_block

Each original `bar.sync 0` / `barrier.sync 0` becomes
`mov site, k; bra sync; resume_k:` so every barrier round is one execution of
the single `barrier.red` by every thread of the worker: working threads once per
original barrier, finished threads once per round, and the round where nobody
is working releases all of them together. The loop-top barrier (barrier 1,
never used by accepted kernels) separates consecutive original blocks, so a
block never sees shared memory still in use by the previous one; the index slot
is double-buffered so one barrier per block suffices.

The transformed entries declare NO shared memory of their own: the index is
broadcast through the worker's slot in the State (global memory; the
barrier orders the leader's store before the other threads' loads). Static
shared memory is laid out before the dynamic (`.extern .shared`) array, so
even a few bytes of it would move the kernel's dynamic shared memory off its
1024-byte-aligned base, which breaks kernels that rely on that alignment
(Triton's swizzled layouts read by wgmma through shared-memory descriptors).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tally.errors import TallyError
from tally.ptx import abi
from tally.ptx.analysis import CTAID, MODES, analyze, barrier_form, refusal
from tally.ptx.parse import Function, Module, parse

P = "%" + "__tally_"  # generated register prefix
L = "__tally_"  # generated label/variable prefix


@dataclass
class EntryResult:
    """Outcome of transforming one entry."""

    entry: str
    mode: str
    new_entry: str | None = None
    appended_params: list[tuple[str, str]] = field(default_factory=list)
    refusal: str | None = None

    @property
    def message(self) -> str:
        if self.refusal:
            return f"not transformable: {self.refusal}"
        return "transformable"


@dataclass
class ModuleResult:
    text: str
    entries: list[EntryResult]


def transform_module(module: Module | str, mode: str, entries: list[str] | None = None) -> ModuleResult:
    """Add the `mode` transformation of each named entry (default: all) to the module.

    Refused entries are reported and left alone; the returned text always
    contains every original entry unchanged.
    """
    if isinstance(module, str):
        module = parse(module)
    if mode not in MODES:
        raise TallyError(f"unknown transformation mode {mode!r} (expected one of {', '.join(MODES)})")
    targets = [module.entry(name) for name in entries] if entries else module.entries
    results, insertions = [], []
    existing = {function.name for function in module.functions}
    for entry in targets:
        result = EntryResult(entry.name, mode)
        reason = refusal(module, entry, mode)
        new_name = abi.transformed_name(entry.name, mode)
        if reason is None and new_name in existing:
            reason = f"the module already has an entry named {new_name}"
        if reason is not None:
            result.refusal = reason
        else:
            insertions.append((entry.end, "\n\n" + transform_entry(module, entry, mode)))
            result.new_entry = new_name
            result.appended_params = abi.appended_params(mode, module.address_size)
        results.append(result)
    return ModuleResult(module.with_insertions(insertions), results)


def transform_entry(module: Module, entry: Function, mode: str) -> str:
    """The text of the new entry (the caller has checked `refusal` is None)."""
    usage = analyze(module, entry)
    header = _header(module, entry, mode)
    statements = entry.statements
    split = next((i for i, s in enumerate(statements) if s.kind != "directive"), len(statements))
    body_start = entry.body_open + 1
    prologue_at = statements[split].start if split < len(statements) else entry.end - 1
    # Back up to the start of the prologue's line so indentation stays tidy.
    line_start = module.text.rfind("\n", body_start, prologue_at) + 1 or prologue_at
    prologue_at = line_start if line_start > body_start else prologue_at
    worker_loop = mode != "slice"
    routed = worker_loop and usage.barrier_sites > 0

    out = [header, "{", _declarations(module, mode, routed)]
    out.append(module.text[body_start:prologue_at])
    out.append(_prologue(module, mode, routed))
    site = 0
    cursor = prologue_at
    for statement in statements[split:]:
        if statement.kind != "instruction":
            continue
        replacement = None
        if worker_loop and statement.root in ("ret", "exit"):
            guard = f"@{statement.predicate} " if statement.predicate else ""
            replacement = f"{guard}bra {L}thread_done;"
        elif routed and statement.root in ("bar", "barrier") and barrier_form(statement) is None:
            replacement = f"mov.u32 {P}site, {site};\n\tbra {L}sync;\n{L}resume_{site}:"
            site += 1
        elif CTAID.search(statement.operands):
            replacement = CTAID.sub(_ctaid_register, statement.text)
        if replacement is not None:
            out.append(module.text[cursor : statement.start])
            out.append(replacement)
            cursor = statement.end
    out.append(module.text[cursor : entry.end - 1])
    if worker_loop:
        out.append(_epilogue(usage, site))
    out.append("}")
    return "".join(out)


def _ctaid_register(match) -> str:
    return f"{P}{match.group(1)}_{match.group(2)}"


def _header(module: Module, entry: Function, mode: str) -> str:
    text = module.text
    new_name = abi.transformed_name(entry.name, mode)
    declarations = ",\n".join(f"\t.param {ptx_type} {name}" for name, ptx_type in abi.appended_params(mode, module.address_size))
    if entry.params_open >= 0:
        if entry.params:
            params = text[entry.params_open : entry.params_close].rstrip() + ",\n" + declarations + "\n)"
        else:
            params = "(\n" + declarations + "\n)"
        return (
            text[entry.start : entry.name_start]
            + new_name
            + text[entry.name_start + len(entry.name) : entry.params_open]
            + params
            + text[entry.params_close + 1 : entry.body_open]
        )
    after_name = entry.name_start + len(entry.name)
    return (
        text[entry.start : entry.name_start]
        + new_name
        + "(\n"
        + declarations
        + "\n)"
        + text[after_name : entry.body_open]
    )


def _address_type(module: Module) -> tuple[str, str]:
    return (".b64", "u64") if module.address_size == 64 else (".b32", "u32")


def _declarations(module: Module, mode: str, routed: bool) -> str:
    lines = [
        f"\n\t.reg .b32 {P}ctaid_x, {P}ctaid_y, {P}ctaid_z, {P}nctaid_x, {P}nctaid_y, {P}nctaid_z;",
        f"\t.reg .b32 {P}index, {P}total, {P}tmp<4>;",
        f"\t.reg .pred {P}past_end;",
    ]
    if mode != "slice":
        address_reg, _ = _address_type(module)
        lines += [
            f"\t.reg .b32 {P}parity, {P}worker, {P}site;",
            f"\t.reg {address_reg} {P}state, {P}retreat_address, {P}slots, {P}slot;",
            f"\t.reg .pred {P}leader, {P}retreat, {P}working, {P}any_working, {P}is_site;",
        ]
    return "\n".join(lines) + "\n"


def _load_grid() -> list[str]:
    return [
        f"ld.param.u32 {P}nctaid_x, [{abi.GRID_PARAMS[0]}];",
        f"ld.param.u32 {P}nctaid_y, [{abi.GRID_PARAMS[1]}];",
        f"ld.param.u32 {P}nctaid_z, [{abi.GRID_PARAMS[2]}];",
        f"mul.lo.u32 {P}total, {P}nctaid_x, {P}nctaid_y;",
        f"mul.lo.u32 {P}total, {P}total, {P}nctaid_z;",
    ]


def _unlinearize() -> list[str]:
    """index -> (ctaid_x, ctaid_y, ctaid_z), x fastest (abi.original_ctaid)."""
    return [
        f"div.u32 {P}tmp0, {P}index, {P}nctaid_x;",
        f"mul.lo.u32 {P}tmp1, {P}tmp0, {P}nctaid_x;",
        f"sub.u32 {P}ctaid_x, {P}index, {P}tmp1;",
        f"div.u32 {P}ctaid_z, {P}tmp0, {P}nctaid_y;",
        f"mul.lo.u32 {P}tmp1, {P}ctaid_z, {P}nctaid_y;",
        f"sub.u32 {P}ctaid_y, {P}tmp0, {P}tmp1;",
    ]


def _prologue(module: Module, mode: str, routed: bool) -> str:
    if mode == "slice":
        lines = _load_grid() + [
            f"ld.param.u32 {P}index, [{abi.BLOCK_OFFSET_PARAM}];",
            # linear index of this block inside the slice's own grid
            f"mov.u32 {P}tmp0, %ctaid.x;",
            f"mov.u32 {P}tmp1, %ctaid.y;",
            f"mov.u32 {P}tmp2, %ctaid.z;",
            f"mov.u32 {P}tmp3, %nctaid.y;",
            f"mad.lo.u32 {P}tmp2, {P}tmp2, {P}tmp3, {P}tmp1;",
            f"mov.u32 {P}tmp3, %nctaid.x;",
            f"mad.lo.u32 {P}tmp2, {P}tmp2, {P}tmp3, {P}tmp0;",
            f"add.u32 {P}index, {P}index, {P}tmp2;",
            # a slice grid may overhang the original grid: those blocks do nothing
            f"setp.ge.u32 {P}past_end, {P}index, {P}total;",
            f"@{P}past_end exit;",
        ] + _unlinearize()
        return "".join(f"\t{line}\n" for line in lines) + "\n"

    _, address = _address_type(module)
    lines = _load_grid() + [
        f"ld.param.{address} {P}state, [{abi.STATE_PARAM}];",
        f"cvta.to.global.{address} {P}state, {P}state;",
        f"add.{address} {P}retreat_address, {P}state, {abi.RETREAT_OFFSET};",
    ] + _worker_slots(module) + [
        f"mov.u32 {P}tmp0, %tid.x;",
        f"mov.u32 {P}tmp1, %tid.y;",
        f"or.b32 {P}tmp0, {P}tmp0, {P}tmp1;",
        f"mov.u32 {P}tmp1, %tid.z;",
        f"or.b32 {P}tmp0, {P}tmp0, {P}tmp1;",
        f"setp.eq.u32 {P}leader, {P}tmp0, 0;",
        f"mov.u32 {P}parity, 0;",
    ]
    ordering = _slot_ordering(module)
    loop = [
        f"{L}next_block:",
        f"\tmov.u32 {P}index, {abi.PREEMPTED_SENTINEL};",
    ] + ["\t" + line for line in _slot_address(module)] + [
        f"\t@!{P}leader bra {L}published;",
    ]
    if mode == "preemptible":
        loop += [
            f"\tld.volatile.global.u32 {P}tmp1, [{P}retreat_address];",
            f"\tsetp.ne.u32 {P}retreat, {P}tmp1, 0;",
            f"\t@!{P}retreat atom.global.add.u32 {P}index, [{P}state], 1;",
        ]
    else:
        loop.append(f"\tatom.global.add.u32 {P}index, [{P}state], 1;")
    loop += [
        f"\tst.{ordering}.global.u32 [{P}slot], {P}index;",
        f"{L}published:",
        "\tbarrier.sync 1;",
        f"\tld.{ordering}.global.u32 {P}index, [{P}slot];",
        f"\txor.b32 {P}parity, {P}parity, 1;",
        f"\tsetp.ge.u32 {P}past_end, {P}index, {P}total;",
        f"\t@{P}past_end exit;",
    ] + ["\t" + line for line in _unlinearize()]
    if routed:
        loop.append(f"\tsetp.eq.u32 {P}working, {P}parity, {P}parity;")
    return "".join(f"\t{line}\n" for line in lines) + "\n".join(loop) + "\n"


def _worker_slots(module: Module) -> list[str]:
    """slots = &State.slots[worker] (abi.slot_offset(worker, 0)); worker = the launch block's
    linear index, x fastest (the launch grid is (workers, 1, 1); y/z are folded in anyway)."""
    lines = [
        f"mov.u32 {P}worker, %ctaid.z;",
        f"mov.u32 {P}tmp1, %nctaid.y;",
        f"mov.u32 {P}tmp2, %ctaid.y;",
        f"mad.lo.u32 {P}worker, {P}worker, {P}tmp1, {P}tmp2;",
        f"mov.u32 {P}tmp1, %nctaid.x;",
        f"mov.u32 {P}tmp2, %ctaid.x;",
        f"mad.lo.u32 {P}worker, {P}worker, {P}tmp1, {P}tmp2;",
    ]
    if module.address_size == 64:
        lines += [
            f"mul.wide.u32 {P}slots, {P}worker, {abi.SLOT_STRIDE};",
            f"add.u64 {P}slots, {P}slots, {P}state;",
            f"add.u64 {P}slots, {P}slots, {abi.SLOTS_OFFSET};",
        ]
    else:
        lines += [
            f"mad.lo.u32 {P}slots, {P}worker, {abi.SLOT_STRIDE}, {P}state;",
            f"add.u32 {P}slots, {P}slots, {abi.SLOTS_OFFSET};",
        ]
    return lines


def _slot_address(module: Module) -> list[str]:
    """slot = slots + 4 * parity: this block's half of the worker's double-buffered slot."""
    if module.address_size == 64:
        return [f"mul.wide.u32 {P}slot, {P}parity, 4;", f"add.u64 {P}slot, {P}slot, {P}slots;"]
    return [f"mad.lo.u32 {P}slot, {P}parity, 4, {P}slots;"]


def _slot_ordering(module: Module) -> str:
    """Qualifier of the slot store/load. The barrier between them orders any global
    accesses of the block's threads; the strong CTA-scope form also makes that explicit
    to ptxas. `.relaxed.cta` needs PTX ISA 6.0 and sm_70; older modules use `.volatile`."""
    match = re.match(r"sm_(\d+)", module.target)
    if module.version >= (6, 0) and match and int(match.group(1)) >= 70:
        return "relaxed.cta"
    return "volatile"


def _epilogue(usage, sites: int) -> str:
    lines = [f"\n{L}thread_done:"]
    if sites:
        lines += [
            f"\tsetp.ne.u32 {P}working, {P}parity, {P}parity;",
            f"{L}sync:",
            f"\tbarrier.red.or.pred {P}any_working, 0, {P}working;",
            f"\t@!{P}any_working bra {L}block_done;",
            f"\t@!{P}working bra {L}sync;",
        ]
        for site in range(sites - 1):
            lines += [
                f"\tsetp.eq.u32 {P}is_site, {P}site, {site};",
                f"\t@{P}is_site bra {L}resume_{site};",
            ]
        lines.append(f"\tbra {L}resume_{sites - 1};")
    lines.append(f"{L}block_done:")
    if usage.uses_cp_async:
        lines.append("\tcp.async.wait_all;")
    if usage.uses_bulk_async:
        lines.append("\tcp.async.bulk.wait_group 0;")
    if usage.uses_wgmma:
        # every thread reaches block_done together (from the uniform `@!any` branch)
        lines.append("\twgmma.wait_group.sync.aligned 0;")
    lines.append(f"\tbra {L}next_block;")
    return "\n".join(lines) + "\n"
