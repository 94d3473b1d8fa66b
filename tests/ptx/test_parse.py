import time

import pytest

from tally.errors import TallyError
from tally.ptx.parse import parse, read_module, split_operands
from conftest import CORPUS, CORPUS_FILES


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_round_trips_byte_for_byte(path):
    text = path.read_text()
    module = read_module(path)
    assert str(module) == text
    # every body statement lies inside its function, in order, without overlap
    for function in module.functions:
        last = function.body_open
        for statement in function.statements:
            assert last <= statement.start < statement.end <= function.end
            last = statement.end


def test_module_facts_and_entries():
    module = read_module(CORPUS / "cuda" / "barriers.ptx")
    assert module.version == (9, 0)
    assert module.target == "sm_90"
    assert module.address_size == 64
    names = [entry.name for entry in module.entries]
    assert names == ["block_sum", "early_return_then_sync", "matmul_tiled", "reverse_dynamic_smem",
                     "async_copy_shift", "bounded_square", "limited_registers"]
    bounded = module.entry("bounded_square")
    assert bounded.directives == {"maxntid": "256, 1, 1", "minnctapersm": "2"}
    assert module.entry("limited_registers").directives == {"maxnreg": "32"}
    assert [p.name for p in bounded.params] == ["bounded_square_param_0", "bounded_square_param_1", "bounded_square_param_2"]
    assert bounded.params[2].state_space_type == ".u32"
    assert module.function("_Z13helper_squaref").kind == "func"


def test_triton_module_header():
    module = read_module(CORPUS / "triton" / "softmax_rows.ptx")
    (entry,) = module.entries
    assert module.target == "sm_90a"
    assert entry.directives == {"reqntid": "256"}
    assert entry.params[0].text.startswith(".param .u64 .ptr .global")


SNIPPET = """.version 8.0
.target sm_90
.address_size 64
.global .align 4 .b8 table[8] = {1, 2, 3, 4, 5, 6, 7, 8};
.extern .func (.param .b32 func_retval0) vprintf (.param .b64 a, .param .b64 b);
.visible .entry k(
\t.param .u64 k_param_0   // a comment with a ; and a {
)
.maxntid 64, 1, 1
{
\t.reg .b32 %r<4>; /* block { comment } ; */
\t.reg .b64 %rd<3>;
\t.loc 1 2 3
$L0: L1:\tmov.b64 {%r1, %r2}, %rd1;
\t@!%p1 bra $L0;
\t{
\t.reg .pred p;
\tsetp.eq.u32 p, %r1, 0;
\t}
\tld.global.v2.u32 {%r1,%r2}, [%rd1+8];
\tret;
}
"""


def test_statements_of_a_snippet():
    module = parse(SNIPPET)
    assert str(module) == SNIPPET
    assert [item.kind for item in module.items] == ["version", "target", "address_size", "other", "func", "entry"]
    entry = module.entry("k")
    kinds = [(s.kind, s.label or s.opcode) for s in entry.statements]
    assert kinds == [
        ("directive", ".reg"), ("directive", ".reg"), ("directive", ".loc"),
        ("label", "$L0"), ("label", "L1"), ("instruction", "mov.b64"), ("instruction", "bra"),
        ("open", ""), ("directive", ".reg"), ("instruction", "setp.eq.u32"), ("close", ""),
        ("instruction", "ld.global.v2.u32"), ("instruction", "ret"),
    ]
    mov = entry.statements[5]
    assert mov.operand_list() == ["{%r1, %r2}", "%rd1"]
    assert entry.statements[6].predicate == "!%p1"
    assert entry.directives == {"maxntid": "64, 1, 1"}
    assert [p.name for p in entry.params] == ["k_param_0"]
    assert not module.function("vprintf").has_body


def test_split_operands_nesting():
    assert split_operands("%r1, [%rd1+4], {%f1, %f2}") == ["%r1", "[%rd1+4]", "{%f1, %f2}"]
    assert split_operands("(retval0), vprintf, (param0, param1)") == ["(retval0)", "vprintf", "(param0, param1)"]
    assert split_operands("") == []


@pytest.mark.parametrize("text, message", [
    ("hello world", "not PTX"),
    (".version 8.0\n.entry k() {\n ret;\n", "unbalanced"),
    (".version 8.0\n}\n", "unbalanced"),
    ("", "not PTX"),
])
def test_bad_input_is_a_one_line_tally_error(text, message):
    with pytest.raises(TallyError, match=message) as info:
        parse(text).entries[0].statements if parse(text).entries else None
    assert "\n" not in str(info.value)


def test_read_module_errors(tmp_path):
    with pytest.raises(TallyError, match="cannot read"):
        read_module(tmp_path / "missing.ptx")
    binary = tmp_path / "x.ptx"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TallyError, match="not UTF-8"):
        read_module(binary)


def test_unknown_entry_names_the_known_ones():
    module = read_module(CORPUS / "cuda" / "ordered.ptx")
    with pytest.raises(TallyError, match="chained_scan"):
        module.entry("nope")


def big_module(target_bytes=5_000_000):
    """A ~5 MB module: the Triton matmul entry repeated under new names."""
    text = (CORPUS / "triton" / "matmul_fp16.ptx").read_text()
    header_end = text.index(".visible .entry")
    header, entry = text[:header_end], text[header_end:]
    entry = entry[: entry.index("\n}\n") + 3]
    copies = [entry.replace("matmul_fp16", f"matmul_fp16_{i}") for i in range(target_bytes // len(entry) + 1)]
    return header + "\n".join(copies)


def test_five_megabyte_module_parses_fast():
    text = big_module()
    assert len(text) >= 5_000_000
    started = time.perf_counter()
    module = parse(text)
    elapsed = time.perf_counter() - started
    assert str(module) == text
    assert len(module.entries) > 50
    assert elapsed < 1.0, f"module-level parse of 5 MB took {elapsed:.2f}s"
    started = time.perf_counter()
    statements = sum(len(entry.statements) for entry in module.entries)
    assert statements > 100_000
    assert time.perf_counter() - started < 8.0
