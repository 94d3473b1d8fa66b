"""What a kernel uses, and why a transformation must refuse it.

`refusal(module, entry, mode)` returns None when `mode` can be applied to the
entry, else a one-line reason. The rule is an allow-list: every instruction,
directive, special register and call of the entry (and of every function it
calls, transitively) must be one the transformer understands; anything else
is refused. A refusal is always safe; a wrong transformation is a defect.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tally.ptx.parse import Function, Module, Statement

MODES = ("slice", "ptb", "preemptible")

# Prefix reserved for names the transformer introduces (registers, labels,
# shared variables, parameters). A module that already uses it is refused.
RESERVED_PREFIX = "__tally"

# Instruction names (the part before the first '.') the transformer knows are
# local to one thread or one CTA and do not depend on which SM or grid slice
# the CTA runs on. Anything not listed is refused.
KNOWN_OPCODES = frozenset(
    """
    abs activemask add addc alloca and applypriority atom bar barrier bfe bfi bfind bmsk bra brev brkpt brx
    call clz cnot copysign cos cp createpolicy cvt cvta discard div dp2a dp4a elect ex2 exit fence fma fns
    griddepcontrol isspacep istypep ld ldmatrix ldu lg2 lop3 mad mad24 madc match max mbarrier membar min mov
    movmatrix mul mul24 mma nanosleep neg not or pmevent popc prefetch prefetchu prmt rcp red redux rem ret
    rsqrt sad selp set setmaxnreg setp shf shfl shl shr sin slct sqrt st stackrestore stacksave stmatrix sub subc
    suld suq sured sust szext tanh testp tex tld4 trap txq vabsdiff vabsdiff2 vabsdiff4 vadd vadd2 vadd4 vavrg2
    vavrg4 vmad vmax vmax2 vmax4 vmin vmin2 vmin4 vote vset vset2 vset4 vshl vshr vsub vsub2 vsub4 wgmma wmma xor
    fence tensormap
    """.split()
)

KNOWN_BODY_DIRECTIVES = frozenset(
    {".reg", ".shared", ".local", ".param", ".const", ".global", ".pragma", ".loc", ".file",
     ".branchtargets", ".calltargets", ".callprototype", ".align"}
)

# External functions (declared, not defined in the module) that are safe to
# call from any block: they neither synchronize nor depend on the grid.
SAFE_EXTERNAL_CALLS = frozenset({"vprintf", "malloc", "free", "__assertfail"})

DYNAMIC_PARALLELISM_CALLS = re.compile(
    r"^(cudaLaunchDevice\w*|cudaGetParameterBuffer\w*|cudaDeviceSynchronize\w*|cudaStream\w+|cudaEvent\w+|"
    r"cudaGraph\w+|cudaGetDevice\w*|cudaDeviceGet\w+|cudaMalloc\w*|cudaFree\w*|cudaFunc\w+|cudaOccupancy\w+|"
    r"cudaPeekAtLastError|cudaGetLastError|cudaCDP\w+|__cudaCDP\w+)$"
)
GRID_SYNC_CALLS = re.compile(r"^(cudaCG\w+|__cg_\w+)$")

# Special registers whose value the transformations would change, with the reason to refuse.
_FORBIDDEN_SPECIAL = [
    (re.compile(r"%envreg\d+\b"), "grid-wide sync or cooperative launch (reads {})"),
    (re.compile(r"%(?:cluster_ctaid|cluster_nctaid|cluster_ctarank|cluster_nctarank|clusterid|nclusterid|is_explicit_cluster)\b(?:\.[xyz]\b)?"),
     "thread-block clusters (reads {})"),
    (re.compile(r"%n?smid\b"), "SM-dependent logic (reads {})"),
    (re.compile(r"%gridid\b"), "grid-dependent logic (reads {})"),
    (re.compile(r"%current_graph_exec\b"), "device graph launch (reads {})"),
    (re.compile(r"%reserved_smem_offset\w*\b"), "reserved shared memory layout (reads {})"),
]
CTAID = re.compile(r"%(n?ctaid)(?:\.([xyz]))?(?![\w$])")
_SYMBOL = re.compile(r"[A-Za-z_$][\w$]*")


@dataclass
class Usage:
    """What one function (with everything it calls) does that matters for the transformations."""

    reasons: list[str] = field(default_factory=list)  # refusals for every mode
    ptb_reasons: list[str] = field(default_factory=list)  # refusals for ptb/preemptible only
    barrier_sites: int = 0  # block-wide barriers the worker loop must route
    returns: int = 0  # ret/exit statements
    uses_cp_async: bool = False  # cp.async (non-bulk) groups that may be pending at block end
    uses_bulk_async: bool = False  # cp.async.bulk groups
    uses_wgmma: bool = False  # wgmma.mma_async groups (drained at block end by the worker loop)
    reads_ctaid: bool = False


def refusal(module: Module, entry: Function, mode: str) -> str | None:
    """None if `mode` can transform `entry`, else the reason (without the 'not transformable: ' prefix)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    usage = analyze(module, entry)
    if usage.reasons:
        return usage.reasons[0]
    if mode != "slice" and usage.ptb_reasons:
        return usage.ptb_reasons[0]
    return None


def analyze(module: Module, entry: Function) -> Usage:
    usage = Usage()
    if RESERVED_PREFIX in module.text:
        usage.reasons.append(f"module already uses the reserved name prefix {RESERVED_PREFIX}")
    for directive in ("reqnctapercluster", "explicitcluster", "maxclusterrank"):
        if directive in entry.directives:
            usage.reasons.append(f"thread-block clusters (.{directive})")
    if module.address_size not in (32, 64):
        usage.reasons.append(f"unsupported .address_size {module.address_size}")
    _scan_function(module, entry, usage, is_entry=True, visiting=set())
    if usage.uses_wgmma and usage.barrier_sites == 0:
        # The worker loop drains pending wgmma groups (wgmma.wait_group.sync.aligned 0)
        # where all threads of the block meet after the block's last barrier round;
        # without block barriers there is no such convergent point.
        usage.ptb_reasons.append(
            "wgmma without block barriers (pending wgmma groups could not be drained uniformly between blocks)"
        )
    return usage


def _scan_function(module: Module, function: Function, usage: Usage, is_entry: bool, visiting: set[str]) -> None:
    visiting.add(function.name)
    where = "" if is_entry else f" in called function {function.name}"
    for statement in function.statements:
        if statement.kind == "directive":
            if statement.opcode not in KNOWN_BODY_DIRECTIVES:
                usage.reasons.append(f"unsupported directive {statement.opcode}{where}")
            if ".shared::cluster" in statement.operands or statement.opcode == ".shared" and "::cluster" in statement.text:
                usage.reasons.append(f"distributed shared memory (.shared::cluster){where}")
            continue
        if statement.kind != "instruction":
            continue
        _scan_instruction(module, statement, usage, is_entry, where, visiting)


def _scan_instruction(module, statement: Statement, usage: Usage, is_entry: bool, where: str, visiting: set[str]) -> None:
    root, opcode, operands = statement.root, statement.opcode, statement.operands
    if "::cluster" in opcode or root in ("mapa", "getctarank") or opcode.startswith("barrier.cluster"):
        usage.reasons.append(f"thread-block clusters ({opcode}){where}")
    if opcode.startswith(("st.async", "red.async")) or "multicast::cluster" in opcode:
        usage.reasons.append(f"thread-block clusters ({opcode}){where}")
    if root not in KNOWN_OPCODES:
        usage.reasons.append(f"unknown instruction {opcode}{where}")
        return
    for pattern, reason in _FORBIDDEN_SPECIAL:
        found = pattern.search(operands)
        if found:
            usage.reasons.append(reason.format(found.group()) + where)
    for found in CTAID.finditer(operands):
        if found.group(2) is None:
            usage.reasons.append(f"vector read of %{found.group(1)}{where}")
        elif not is_entry:
            usage.reasons.append(f"reads %{found.group(1)}.{found.group(2)}{where} (only the entry's reads are rewritten)")
        usage.reads_ctaid = True
    if root in ("ret", "exit"):
        if is_entry:
            usage.returns += 1
        elif root == "exit":
            usage.ptb_reasons.append(f"exit{where} (would end the worker, not one block)")
    elif root in ("bar", "barrier"):
        _scan_barrier(statement, usage, is_entry, where)
    elif root == "call":
        _scan_call(module, statement, usage, where, visiting)
    elif root == "cp" and opcode.startswith("cp.async"):
        if opcode.startswith("cp.async.bulk"):
            usage.uses_bulk_async = True
            if "mbarrier::complete_tx" in opcode:
                usage.ptb_reasons.append(
                    f"asynchronous bulk copies completing on an mbarrier ({opcode}){where}: "
                    "one could still be in flight when the next block reuses shared memory"
                )
        else:
            usage.uses_cp_async = True
    elif root == "wgmma":
        usage.uses_wgmma = True
    elif root == "setmaxnreg":
        usage.ptb_reasons.append(f"warp-specialized register reallocation ({opcode}){where}")
    if opcode.startswith("mbarrier") and "shared::cluster" in opcode:
        usage.reasons.append(f"distributed shared memory ({opcode}){where}")
    if root in ("ld", "st", "atom", "red", "cp", "mbarrier") and "shared::cluster" in opcode:
        usage.reasons.append(f"distributed shared memory ({opcode}){where}")


def barrier_form(statement: Statement) -> str | None:
    """None if the statement is a block-wide barrier the worker loop can route
    (`bar.sync 0`, `bar.cta.sync 0`, `barrier.sync[.aligned] 0`, unpredicated,
    no thread count), else the reason it cannot."""
    opcode, operands = statement.opcode, statement.operand_list()
    parts = opcode.split(".")
    kind = [part for part in parts[1:] if part not in ("cta", "aligned")]
    if kind != ["sync"]:
        return f"barrier form {opcode} (only bar.sync/barrier.sync 0 without thread count are routed)"
    if len(operands) != 1:
        return f"{opcode} with a thread count"
    if operands[0] != "0":
        return f"{opcode} on named barrier {operands[0]}"
    if statement.predicate:
        return f"predicated {opcode}"
    return None


def _scan_barrier(statement: Statement, usage: Usage, is_entry: bool, where: str) -> None:
    if statement.opcode.startswith(("bar.warp", "barrier.warp")):
        return  # warp-level: unaffected by the block loop
    if not is_entry:
        usage.ptb_reasons.append(f"block-wide barrier {statement.opcode}{where}")
        return
    problem = barrier_form(statement)
    if problem:
        usage.ptb_reasons.append(problem)
    else:
        usage.barrier_sites += 1


def _scan_call(module: Module, statement: Statement, usage: Usage, where: str, visiting: set[str]) -> None:
    operands = statement.operand_list()
    # call{.uni} (ret), fname, (args) ; call fname, (args); call fname; indirect: call (ret), %rd, (args), proto;
    names = [op for op in operands if not op.startswith("(")]
    if not names:
        usage.reasons.append(f"call without a target{where}")
        return
    target = names[0]
    if not _SYMBOL.fullmatch(target) or target.startswith("%"):
        usage.reasons.append(f"indirect call through {target}{where}")
        return
    if DYNAMIC_PARALLELISM_CALLS.match(target):
        usage.reasons.append(f"dynamic parallelism (calls {target}){where}")
        return
    if GRID_SYNC_CALLS.match(target):
        usage.reasons.append(f"grid-wide sync or cooperative launch (calls {target}){where}")
        return
    callee = module.function(target)
    if callee is None or callee.kind != "func":
        usage.reasons.append(f"call to unknown function {target}{where}")
        return
    if not callee.has_body:
        if target not in SAFE_EXTERNAL_CALLS:
            usage.reasons.append(f"call to external function {target}{where}")
        return
    if target in visiting:
        return  # recursion: the callee is already being scanned
    _scan_function(module, callee, usage, is_entry=False, visiting=visiting)
