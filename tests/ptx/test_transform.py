import re

import pytest

from tally.errors import TallyError
from tally.ptx import abi
from tally.ptx.analysis import refusal
from tally.ptx.parse import parse, read_module
from tally.ptx.ptxas import assemble
from tally.ptx.transform import transform_module
from conftest import CORPUS, CORPUS_FILES, MANIFEST, MODES

KERNELS = [(k["module"], k["entry"]) for k in MANIFEST["kernels"]]


def test_manifest_covers_every_corpus_entry():
    listed = set(KERNELS)
    for path in CORPUS_FILES:
        for entry in read_module(path).entries:
            assert (f"{path.parent.name}/{path.name}", entry.name) in listed


@pytest.mark.parametrize("module_path, entry_name", KERNELS)
def test_refusals_match_the_manifest(module_path, entry_name):
    kernel = next(k for k in MANIFEST["kernels"] if (k["module"], k["entry"]) == (module_path, entry_name))
    module = read_module(CORPUS / module_path)
    entry = module.entry(entry_name)
    for mode in MODES:
        expected = kernel["expect_refusal"][mode]
        reason = refusal(module, entry, mode)
        if expected is None:
            assert reason is None, f"{mode}: unexpectedly refused: {reason}"
        else:
            assert reason is not None and reason.startswith(expected), f"{mode}: {reason!r} != {expected!r}"


def test_enough_of_the_corpus_transforms():
    accepted = {mode: 0 for mode in MODES}
    expected_ok = {mode: 0 for mode in MODES}
    for kernel in MANIFEST["kernels"]:
        module = read_module(CORPUS / kernel["module"])
        for mode in MODES:
            if kernel["expect_refusal"][mode] is None:
                expected_ok[mode] += 1
                accepted[mode] += refusal(module, module.entry(kernel["entry"]), mode) is None
    for mode in MODES:
        assert accepted[mode] >= 0.95 * expected_ok[mode]
    assert sum(1 for k in MANIFEST["kernels"] if k["module"].startswith("triton/")) >= 6


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ("original",) + MODES)
def test_every_corpus_module_assembles(assembled_corpus, path, mode):
    result, transformed = assembled_corpus[(path.name, mode)]
    assert result.ok, f"ptxas {' '.join(result.command)}:\n{result.errors}"
    if transformed is not None:
        for entry in transformed.entries:
            if entry.new_entry:
                assert f".entry {entry.new_entry}(" in transformed.text


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", MODES)
def test_original_text_is_kept_and_new_entries_are_well_formed(path, mode):
    module = read_module(path)
    result = transform_module(module, mode)
    again = parse(result.text)
    # Removing the new entries gives back the original module, byte for byte.
    new = [again.entry(e.new_entry) for e in result.entries if e.new_entry]
    stripped, last = [], 0
    for function in new:
        stripped.append(result.text[last : function.start - 2])  # each insertion is "\n\n" + entry
        last = function.end
    stripped.append(result.text[last:])
    assert "".join(stripped) == module.text
    for function, entry_result in zip(new, [e for e in result.entries if e.new_entry]):
        original = module.entry(entry_result.entry)
        assert [p.name for p in function.params] == [p.name for p in original.params] + [
            name for name, _ in abi.appended_params(mode)
        ]
        assert function.directives == original.directives  # .maxntid/.reqntid/.maxnreg/.minnctapersm kept
        check_generated_body(module, original, function, mode)


SLICE_PROLOGUE_READS = {"mov.u32 %__tally_tmp0, %ctaid.x;", "mov.u32 %__tally_tmp1, %ctaid.y;",
                        "mov.u32 %__tally_tmp2, %ctaid.z;", "mov.u32 %__tally_tmp3, %nctaid.y;",
                        "mov.u32 %__tally_tmp3, %nctaid.x;"}
# the worker loop reads its own launch position once, to find its slot in the State
WORKER_PROLOGUE_READS = {"mov.u32 %__tally_worker, %ctaid.z;", "mov.u32 %__tally_tmp1, %nctaid.y;",
                         "mov.u32 %__tally_tmp2, %ctaid.y;", "mov.u32 %__tally_tmp1, %nctaid.x;",
                         "mov.u32 %__tally_tmp2, %ctaid.x;"}


def shared_declarations(function):
    return [" ".join(s.text.split()) for s in function.statements if s.kind == "directive" and s.opcode == ".shared"]


def check_generated_body(module, original, function, mode):
    ours = SLICE_PROLOGUE_READS if mode == "slice" else WORKER_PROLOGUE_READS
    for statement in function.statements:
        if statement.kind == "instruction" and re.search(r"%n?ctaid", statement.operands):
            # the only real %ctaid/%nctaid reads left are the prologue's own
            assert " ".join(statement.text.split()) in ours, statement.text
    # The new entry declares exactly the original's shared memory: anything added would
    # move the dynamic shared memory (laid out after all static shared variables).
    assert shared_declarations(function) == shared_declarations(original)
    assert "__tally" not in "".join(shared_declarations(function))
    original_returns = sum(1 for s in original.statements if s.kind == "instruction" and s.root in ("ret", "exit"))
    returns = [s for s in function.statements if s.kind == "instruction" and s.root in ("ret", "exit")]
    branches_to_done = [s for s in function.statements if s.kind == "instruction" and s.operands == "__tally_thread_done"]
    if mode == "slice":
        assert len(returns) == original_returns + 1  # + the overhang exit
        return
    # the worker loop: every original ret/exit ends one original block, the only exit is the loop's
    assert len(branches_to_done) == original_returns
    assert [s.predicate for s in returns] == ["%__tally_past_end"]
    barriers = [s for s in original.statements if s.kind == "instruction" and s.root in ("bar", "barrier")]
    resumes = [s for s in function.statements if s.kind == "label" and s.label.startswith("__tally_resume_")]
    assert len(resumes) == len(barriers)
    remaining = [s.opcode for s in function.statements if s.kind == "instruction" and s.root in ("bar", "barrier")]
    expected = ["barrier.sync"] + (["barrier.red.or.pred"] if barriers else [])
    assert remaining == expected


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", MODES)
def test_transformed_entries_keep_the_static_shared_memory_size(assembled_corpus, path, mode):
    """ptxas's own account: a transformed entry uses exactly the original's static shared
    memory, so the dynamic shared memory starts at the same (1024-byte aligned) offset.
    (8 extra bytes here put Triton's wgmma operands at +16 and broke matmul/attention.)"""
    result, transformed = assembled_corpus[(path.name, mode)]
    assert result.ok, result.errors
    for entry in transformed.entries:
        if entry.new_entry:
            original, new = result.resources[entry.entry], result.resources[entry.new_entry]
            assert new.smem == original.smem, f"{entry.new_entry}: {new.smem} bytes smem, original {original.smem}"


def shared_accesses(function):
    return [" ".join(s.text.split()) for s in function.statements
            if s.kind == "instruction" and ("shared" in s.opcode or s.root in ("ldmatrix", "stmatrix"))]


@pytest.mark.parametrize("kernel", ["matmul_fp16", "attention_fwd"])
def test_wgmma_kernels_keep_their_shared_layout_and_drain_wgmma_between_blocks(kernel):
    module = read_module(CORPUS / "triton" / f"{kernel}.ptx")
    original = module.entry(kernel)
    module_shared = re.compile(r"^\s*(?:\.extern\s+)?\.shared\b.*$", re.M)
    assert module_shared.findall(module.text) == [".extern .shared .align 16 .b8 global_smem[];"]
    for mode in ("ptb", "preemptible"):
        text = transform_module(module, mode).text
        new = parse(text).entry(abi.transformed_name(kernel, mode))
        # no shared variable added, in the entry or at module level; shared accesses are the original's
        assert shared_declarations(new) == shared_declarations(original) == []
        assert module_shared.findall(text) == module_shared.findall(module.text)
        assert shared_accesses(new) == shared_accesses(original)
        # the index travels through the worker's slot in the State
        assert "st.relaxed.cta.global.u32 [%__tally_slot], %__tally_index;" in new.text
        assert "ld.relaxed.cta.global.u32 %__tally_index, [%__tally_slot];" in new.text
        # wgmma groups are drained where every thread of the block meets, before the next block
        tail = new.text[new.text.index("__tally_block_done:"):]
        assert tail.index("wgmma.wait_group.sync.aligned 0;") < tail.index("bra __tally_next_block;")


def test_wgmma_without_block_barriers_is_refused_by_worker_loops():
    body = ("\t.reg .b64 %rd<3>;\n\t.reg .f32 %f<5>;\n\twgmma.fence.sync.aligned;\n"
            "\twgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%f1,%f2,%f3,%f4}, %rd1, %rd2, 1, 1, 1, 0, 0;\n"
            "\twgmma.commit_group.sync.aligned;\n\twgmma.wait_group.sync.aligned 0;")
    module = parse(mini(body).replace(".target sm_90", ".target sm_90a"))
    entry = module.entry("k")
    assert refusal(module, entry, "slice") is None
    for mode in ("ptb", "preemptible"):
        assert refusal(module, entry, mode).startswith("wgmma without block barriers")
    with_barrier = parse(mini("\tbar.sync 0;\n" + body).replace(".target sm_90", ".target sm_90a"))
    for mode in ("ptb", "preemptible"):
        assert refusal(with_barrier, with_barrier.entry("k"), mode) is None


def test_async_copies_are_drained_between_blocks():
    module = read_module(CORPUS / "cuda" / "barriers.ptx")
    text = transform_module(module, "ptb", ["async_copy_shift"]).text
    body = text[text.index(".entry async_copy_shift__tally_ptb") :]
    assert body.index("cp.async.wait_all;") > body.index("__tally_block_done:")


MINI = """.version 8.0
.target sm_90
.address_size {bits}

.visible .entry k{params}
{{
\t.reg .b32 %r<4>;
{body}
\tret;
}}
"""


def mini(body, params="(\n\t.param .u64 k_param_0\n)", bits=64):
    return MINI.format(body=body, params=params, bits=bits)


REFUSED_EVERYWHERE = [
    ("\tmov.u32 %r1, %nsmid;", "SM-dependent logic (reads %nsmid)"),
    ("\tmov.u32 %r1, %smid;", "SM-dependent logic (reads %smid)"),
    ("\tmov.u32 %r1, %clusterid.x;", "thread-block clusters (reads %clusterid.x)"),
    ("\tmov.u32 %r1, %cluster_ctarank;", "thread-block clusters (reads %cluster_ctarank)"),
    ("\tmov.u32 %r1, %envreg1;", "grid-wide sync or cooperative launch (reads %envreg1)"),
    ("\tmov.u32 %r1, %gridid;", "grid-dependent logic"),
    ("\tbarrier.cluster.arrive;", "thread-block clusters (barrier.cluster.arrive)"),
    ("\tld.shared::cluster.u32 %r1, [%r2];", "thread-block clusters (ld.shared::cluster.u32)"),
    ("\tmapa.shared::cluster.u32 %r1, %r2, %r3;", "thread-block clusters"),
    ("\tfrobnicate.u32 %r1, %r2;", "unknown instruction frobnicate.u32"),
    ("\tmov.v4.u32 {%r0,%r1,%r2,%r3}, %ctaid;", "vector read of %ctaid"),
    ("\t.reg .b64 %rd<2>;\n\tcall (%r1), %rd1, (%r2), proto;", "indirect call through %rd1"),
    ("\tmov.u32 %__tally_x, 0;", "module already uses the reserved name prefix __tally"),
]


@pytest.mark.parametrize("body, reason", REFUSED_EVERYWHERE)
def test_refused_constructs(body, reason):
    module = parse(mini(body))
    for mode in MODES:
        assert (refusal(module, module.entry("k"), mode) or "").startswith(reason)
    result = transform_module(module, "ptb")
    assert result.text == module.text
    assert result.entries[0].message.startswith("not transformable: ")


REFUSED_IN_WORKER_LOOPS = [
    ("\tbar.sync 0, 64;", "bar.sync with a thread count"),
    ("\tbarrier.sync 0, 64;", "barrier.sync with a thread count"),
    ("\tbar.sync 1;", "bar.sync on named barrier 1"),
    ("\tbar.sync %r1;", "bar.sync on named barrier %r1"),
    ("\tbar.arrive 0, 64;", "barrier form bar.arrive"),
    ("\tbarrier.arrive 0, 64;", "barrier form barrier.arrive"),
    ("\t.reg .pred %p<2>;\n\tbar.red.or.pred %p1, 0, %p0;", "barrier form bar.red.or.pred"),
    ("\t.reg .pred %p<2>;\n\t@%p1 bar.sync 0;", "predicated bar.sync"),
    ("\tsetmaxnreg.inc.sync.aligned.u32 240;", "warp-specialized register reallocation"),
    ("\t.reg .b64 %rd<3>;\n\tcp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1], 16, [%r2];",
     "thread-block clusters"),
    ("\t.reg .b64 %rd<3>;\n\tcp.async.bulk.shared::cta.global.mbarrier::complete_tx::bytes [%r1], [%rd1], 16, [%r2];",
     "asynchronous bulk copies completing on an mbarrier"),
]


@pytest.mark.parametrize("body, reason", REFUSED_IN_WORKER_LOOPS)
def test_refused_only_by_worker_loops(body, reason):
    module = parse(mini(body))
    entry = module.entry("k")
    assert (refusal(module, entry, "ptb") or "").startswith(reason)
    assert (refusal(module, entry, "preemptible") or "").startswith(reason)
    if not reason.startswith("thread-block"):
        assert refusal(module, entry, "slice") is None


CALLS = """.version 8.0
.target sm_90
.address_size 64
.extern .func (.param .b32 func_retval0) vprintf (.param .b64 a, .param .b64 b);
.extern .func mystery (.param .b64 a);
.func (.param .b32 r) helper_exit () {{ exit; }}
.func (.param .b32 r) helper_bar () {{ bar.sync 0; ret; }}
.func (.param .b32 r) helper_ok () {{ .reg .b32 %x; mov.u32 %x, %tid.x; st.param.b32 [r], %x; ret; }}
.func (.param .b32 r) helper_grid () {{ .reg .b32 %x; mov.u32 %x, %nctaid.y; st.param.b32 [r], %x; ret; }}
.func (.param .b32 r) helper_cg () {{ .reg .b32 %x; call.uni cudaCGGetIntrinsicHandle, (); ret; }}
.visible .entry k()
{{
\t.reg .b32 %r<4>;
\t{{
\t.param .b32 retval0;
\tcall.uni (retval0), {callee}, ();
\t}}
\tret;
}}
"""


@pytest.mark.parametrize("callee, slice_reason, loop_reason", [
    ("helper_ok", None, None),
    ("helper_exit", None, "exit in called function helper_exit"),
    ("helper_bar", None, "block-wide barrier bar.sync in called function helper_bar"),
    ("helper_grid", "reads %nctaid.y in called function helper_grid", "reads %nctaid.y"),
    ("helper_cg", "grid-wide sync or cooperative launch (calls cudaCGGetIntrinsicHandle)", "grid-wide sync"),
    ("mystery", "call to external function mystery", "call to external function"),
    ("nowhere", "call to unknown function nowhere", "call to unknown function"),
])
def test_calls_are_followed(callee, slice_reason, loop_reason):
    module = parse(CALLS.format(callee=callee))
    entry = module.entry("k")
    for mode, expected in (("slice", slice_reason), ("ptb", loop_reason), ("preemptible", loop_reason)):
        reason = refusal(module, entry, mode)
        assert (reason is None) == (expected is None), (mode, reason)
        if expected:
            assert reason.startswith(expected)


def test_kernels_without_parameters_and_with_predicated_ret_assemble(ptxas_path):
    body = "\t.reg .pred %p<2>;\n\tmov.u32 %r1, %tid.x;\n\tsetp.eq.u32 %p1, %r1, 3;\n\t@%p1 ret;\n\tbar.sync 0;"
    for params in ("()", ""):
        module = parse(mini(body, params=params))
        for mode in MODES:
            result = transform_module(module, mode)
            assert result.entries[0].new_entry, result.entries[0].message
            new = parse(result.text).entry(abi.transformed_name("k", mode))
            assert [p.name for p in new.params] == [n for n, _ in abi.appended_params(mode)]
            assert "@%p1 bra __tally_thread_done;" in new.text or mode == "slice"
            assembled = assemble(result.text, ptxas=ptxas_path)
            assert assembled.ok, assembled.errors


def test_32_bit_address_form_uses_32_bit_state():
    module = parse(mini("\tmov.u32 %r1, %ctaid.x;", params="(\n\t.param .u32 k_param_0\n)", bits=32))
    text = transform_module(module, "preemptible").text
    new = parse(text).entry("k__tally_preemptible")
    assert new.params[-1].text == ".param .u32 __tally_state"
    assert "cvta.to.global.u32 %__tally_state, %__tally_state;" in text
    assert ".reg .b32 %__tally_state, %__tally_retreat_address, %__tally_slots, %__tally_slot;" in text
    assert f"mad.lo.u32 %__tally_slots, %__tally_worker, {abi.SLOT_STRIDE}, %__tally_state;" in text
    assert "mad.lo.u32 %__tally_slot, %__tally_parity, 4, %__tally_slots;" in text
    # (ptxas 13 no longer assembles 32-bit addressing for any target, so this is checked structurally.)


def test_selecting_entries_and_unknown_entries():
    module = read_module(CORPUS / "cuda" / "elementwise.ptx")
    result = transform_module(module, "slice", ["add_2d"])
    assert [e.new_entry for e in result.entries] == ["add_2d__tally_slice"]
    assert result.text.count("__tally_slice(") == 1
    with pytest.raises(TallyError, match="no entry named"):
        transform_module(module, "slice", ["missing"])
    with pytest.raises(TallyError, match="unknown transformation mode"):
        transform_module(module, "bogus")


def test_transforming_twice_is_refused_not_duplicated():
    module = read_module(CORPUS / "cuda" / "ordered.ptx")
    once = transform_module(module, "ptb").text
    twice = transform_module(once, "ptb")
    assert twice.text == once
    assert all(e.refusal for e in twice.entries)
