"""The layout is defined once in Python; the C header is generated from it."""
import ctypes
import shutil
import subprocess

import pytest

from tally import scoreboard as sb
from tally import scoreboard_codegen


def test_checked_in_header_matches_the_generator():
    assert scoreboard_codegen.HEADER_PATH.read_text() == scoreboard_codegen.render_header(), (
        "agent/scoreboard.h is stale: run `python -m tally.scoreboard_codegen`")


def test_codegen_check_mode_flags_a_stale_header(tmp_path):
    stale = tmp_path / "scoreboard.h"
    stale.write_text(scoreboard_codegen.render_header().replace("uint64_t epoch;", "uint64_t epoch2;"))
    assert scoreboard_codegen.main(["--check", "--output", str(stale)]) == 1
    stale.write_text(scoreboard_codegen.render_header())
    assert scoreboard_codegen.main(["--check", "--output", str(stale)]) == 0


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_header_compiles_and_its_static_asserts_hold(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    # a C file that also checks the agent-facing constants against Python's values
    probe = tmp_path / "probe.c"
    probe.write_text(
        f'#include "{scoreboard_codegen.HEADER_PATH}"\n'
        f"_Static_assert(TALLY_SB_MAGIC == {sb.MAGIC}ULL, \"magic\");\n"
        f"_Static_assert(sizeof(struct tally_sb_header) == {sb.HEADER_SIZE}, \"header\");\n"
        f"_Static_assert(sizeof(struct tally_sb_slot) == {sb.SLOT_SIZE}, \"slot\");\n"
        f"_Static_assert(TALLY_SB_TOTAL_SIZE == {sb.TOTAL_SIZE}, \"total\");\n"
        "_Static_assert(offsetof(struct tally_sb_slot, lanes) % 64 == 0, \"lanes on a cache line\");\n"
    )
    result = subprocess.run([compiler, "-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", str(probe)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("struct", [sb.HEADER, sb.SLOT, sb.LANE], ids=lambda s: s.name)
def test_offsets_agree_with_the_platform_layout(struct):
    cstruct = sb.ctypes_struct(struct)
    assert ctypes.sizeof(cstruct) == struct.size
    for field in struct.fields:
        assert getattr(cstruct, field.name).offset == field.offset, field.name


def test_required_fields_and_alignment():
    header = {f.name for f in sb.HEADER.fields}
    assert {"magic", "version", "header_size", "slot_size", "max_clients", "max_lanes", "gpu_uuid", "daemon_pid",
            "daemon_heartbeat_ns", "daemon_timeout_ns", "idle_window_ns", "turnaround_budget_ns",
            "unthrottle_after_ns", "policy", "hp_active", "hp_last_launch_ns", "epoch"} <= header
    slot = {f.name for f in sb.SLOT.fields}
    assert {"state", "priority", "pid", "launches", "graph_launches", "last_launch_ns", "held_ns", "held_launches",
            "long_kernels", "failopen", "comm", "lanes"} <= slot
    for struct in (sb.HEADER, sb.SLOT, sb.LANE):
        for f in struct.fields:
            assert f.offset % f.align == 0
    assert sb.HEADER_SIZE % 64 == 0 and sb.SLOT_SIZE % 64 == 0
    assert sb.slot_offset(1) % 64 == 0 and sb.lane_offset(3, 0) % 64 == 0
    assert sb.TOTAL_SIZE % sb.PAGE_SIZE == 0 and sb.TOTAL_SIZE >= sb.slot_offset(sb.MAX_CLIENTS)
    # the HP agents' hot store must not share a cache line with what BE agents read
    hot = sb.HEADER.field("hp_last_launch_ns").offset // 64
    assert all(f.offset // 64 != hot for f in sb.HEADER.fields if f.name != "hp_last_launch_ns")


def test_markdown_table_lists_every_field():
    text = scoreboard_codegen.render_markdown()
    for struct in (sb.HEADER, sb.SLOT, sb.LANE):
        for f in struct.fields:
            assert f"| {f.offset} | `{f.name}` |" in text


def test_docs_carry_the_generated_tables():
    docs = scoreboard_codegen.REPO_ROOT / "docs" / "daemon.md"
    assert scoreboard_codegen.render_markdown() in docs.read_text(), (
        "docs/daemon.md's layout tables are stale: paste `python -m tally.scoreboard_codegen --markdown`")
