"""PTX from saved code images: classification, fatbins, Triton's cache.

The synthetic fatbins below are built with the layout NVIDIA's fatbin uses as
far as public sources document it (reverse-engineered: n-eiling's
cuda-fatbin-decompression, the `fatbinary` Rust crate, nvopen-tools' format
notes) and as CUDA 13.0's `fatbinary` tool writes it:

    container: u32 magic 0xBA55ED50, u16 version 1, u16 header_size 16, u64 fat_size
    member:    u16 kind (1 PTX, 2 ELF), u16 0x0101, u32 header_size, u64 payload size,
               ... u32 arch at +28, u64 flags at +40 (0x2000 LZ4, 0x8000 zstd) ...

`test_real_fatbinary_tool` checks the parser against fatbins the real tool
writes when it is installed; real images saved by the agent are checked on
the GPU machine.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tally.blocksched import sources as src
from tally.blocksched.sources import (REASON_COMPRESSED, REASON_CUBIN_ONLY, REASON_UNKNOWN, SourceError, classify,
                                      fatbin_members, find_triton_ptx, ptx_entries, ptx_sources,
                                      triton_ptx_for_cubin)
from tally.errors import TallyError

CORPUS = Path(__file__).resolve().parents[1] / "ptx" / "corpus" / "cuda"
PTX = (CORPUS / "elementwise.ptx").read_text()
ELF = b"\x7fELF\x02\x01\x01\x41" + bytes(range(256)) * 4  # stands in for a cubin (only its bytes matter)
FLAGS = 0x11  # 64-bit, Linux: what fatbinary writes for uncompressed members


def member(kind: int, payload: bytes, arch: int = 80, flags: int = FLAGS, header_size: int | None = None,
           pad: bool = True) -> bytes:
    """One member: header (64 bytes, 80 for PTX as fatbinary writes it) then the payload, NUL-padded to 8."""
    header_size = header_size if header_size is not None else (80 if kind == 1 else 64)
    if pad:
        payload = payload + b"\0" * (-len(payload) % 8)
    head = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x0101, header_size, len(payload), 0, 0x40 if kind == 1 else 0,
                       0, 9 if kind == 1 else 1, arch, 0, 0, flags, 0, 0)
    return head + b"\0" * (header_size - len(head)) + payload


def container(*members: bytes, version: int = 1) -> bytes:
    body = b"".join(members)
    return struct.pack("<IHHQ", 0xBA55ED50, version, 16, len(body)) + body


PTX_MEMBER = member(1, PTX.encode() + b"\0", arch=80)
ELF_MEMBER = member(2, ELF, arch=90)
FATBIN = container(PTX_MEMBER, ELF_MEMBER)


@pytest.fixture(autouse=True)
def fresh_index():
    src.clear_triton_index()
    yield
    src.clear_triton_index()


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("data, kind", [
    (PTX.encode(), "ptx"),
    (PTX.encode() + b"\0", "ptx"),  # as cuModuleLoadData takes it
    (b"  .version 8.4\n.target sm_90\n", "ptx"),
    (FATBIN, "fatbin"),
    (struct.pack("<I", 0xBA55ED50), "fatbin"),  # claims to be one (and fails to parse: see below)
    (ELF, "elf"),
    (b"", "unknown"),
    (b"\0\0\0", "unknown"),
    (b"hello world", "unknown"),
    (b".version 8.4\0garbage after a NUL", "unknown"),
    (b"// .version 8.4 in a comment only", "unknown"),
])
def test_classify(data, kind):
    assert classify(data) == kind


# ---------------------------------------------------------------- fatbins


def test_fatbin_with_a_ptx_and_an_elf_member():
    members = fatbin_members(FATBIN)
    assert [(m.kind, m.arch_name, m.compressed) for m in members] == [("ptx", "sm_80", False), ("elf", "sm_90", False)]
    ptx, elf = members
    assert ptx.offset == 16 and ptx.header_size == 80 and ptx.text == PTX and ptx.reason is None
    assert elf.offset == 16 + len(PTX_MEMBER) and elf.payload.startswith(ELF) and elf.text is None
    result = ptx_sources(FATBIN)
    assert result.kind == "fatbin" and result.reason is None
    assert [(s.origin, s.text) for s in result.sources] == [("fatbin member sm_80", PTX)]
    assert result.notes == ["member 0: ptx sm_80", "member 1: elf sm_90"]
    assert ptx_entries(result.sources[0].text) == ["saxpy", "grid_ids_3d", "add_2d", "exit_early"]


@pytest.mark.parametrize("flags, compression", [(FLAGS | 0x2000, "lz4"), (FLAGS | 0x8000, "zstd")])
def test_compressed_members_are_reported_not_decompressed(flags, compression):
    data = container(member(1, b"\x13\x0a\x01\x00 compressed bytes", flags=flags), ELF_MEMBER)
    ptx = fatbin_members(data)[0]
    assert ptx.compressed and ptx.compression == compression and ptx.text is None and ptx.reason == REASON_COMPRESSED
    result = ptx_sources(data)
    assert result.sources == [] and result.reason == REASON_COMPRESSED
    assert result.notes[0] == f"member 0: ptx sm_80 ({compression}-compressed)"


def test_a_zstd_frame_without_the_flag_is_still_compressed():
    data = container(member(1, b"\x28\xb5\x2f\xfd" + b"\x01" * 40))
    assert fatbin_members(data)[0].compressed and ptx_sources(data).reason == REASON_COMPRESSED


def test_cubin_only_fatbin():
    result = ptx_sources(container(ELF_MEMBER, member(2, ELF, arch=80)))
    assert result.sources == [] and result.reason == REASON_CUBIN_ONLY


def test_a_fatbin_with_one_good_and_one_compressed_ptx_member_gives_the_good_one():
    data = container(member(1, b"zzz", arch=90, flags=FLAGS | 0x8000), PTX_MEMBER)
    result = ptx_sources(data)
    assert [s.origin for s in result.sources] == ["fatbin member sm_80"]
    assert "member 0: ptx sm_90 (zstd-compressed)" in result.notes


@pytest.mark.parametrize("payload, fragment", [(b"\xff\xfe .version", "not UTF-8 text"),
                                               (b".version 8.0\0\x01\x02", "NUL bytes inside"),
                                               (b"", "empty")])
def test_unreadable_ptx_members_are_a_reason(payload, fragment):
    result = ptx_sources(container(member(1, payload)))
    assert result.sources == [] and fragment in result.reason and "sm_80" in result.reason


def test_concatenated_containers_and_zero_padding():
    data = FATBIN + b"\0" * 8 + container(member(1, PTX.encode(), arch=90)) + b"\0" * 3
    assert [(m.index, m.kind, m.arch) for m in fatbin_members(data)] == [(0, "ptx", 80), (1, "elf", 90),
                                                                         (2, "ptx", 90)]
    assert fatbin_members(container()) == [] and ptx_sources(container()).reason == "empty fatbin"


def test_unknown_member_kinds_are_kept_and_skipped():
    data = container(member(0x40, b"lto ir?"))
    assert fatbin_members(data)[0].kind == "kind 64"
    assert ptx_sources(data).reason == "fatbin without PTX or ELF members"


@pytest.mark.parametrize("data, fragment", [
    (struct.pack("<I", 0xBA55ED50), "container header at offset 0 is truncated"),
    (container(PTX_MEMBER, version=2), "container version 2"),
    (FATBIN[:-1], "truncated"),
    (container(PTX_MEMBER)[:-8] + b"\0" * 8 + b"x", "are not another container"),
    (FATBIN + b"garbage!", "are not another container"),
    (container(member(1, PTX.encode(), header_size=32)), "member header size 32"),
    (container(PTX_MEMBER + b"\x01" * 10), "too short for a member header"),
    (struct.pack("<IHHQ", 0xBA55ED50, 1, 8, 0), "container header size 8"),
])
def test_malformed_fatbins_raise_one_line_source_errors(data, fragment):
    with pytest.raises(SourceError) as exc:
        ptx_sources(data)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, TallyError)


def test_a_member_past_its_container_is_malformed():
    bad = bytearray(FATBIN)
    struct.pack_into("<Q", bad, 16 + 8, len(PTX_MEMBER) * 4)  # the PTX member's payload size
    with pytest.raises(SourceError, match="past its container's end"):
        fatbin_members(bytes(bad))


def _result_or_source_error(data: bytes) -> None:
    try:
        result = ptx_sources(data)
    except SourceError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert result.sources or result.reason
    for s in result.sources:
        assert isinstance(s.text, str)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_traceback(data):
    _result_or_source_error(data)
    _result_or_source_error(struct.pack("<I", 0xBA55ED50) + data)  # everything claims to be a fatbin
    _result_or_source_error(struct.pack("<IHH", 0xBA55ED50, 1, 16) + data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(FATBIN) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(FATBIN)))
def test_mutated_fatbins_never_traceback(edits, cut):
    data = bytearray(FATBIN)
    for offset, value in edits:
        data[offset] = value
    _result_or_source_error(bytes(data))
    _result_or_source_error(bytes(data[:cut]))


def test_every_truncation_is_an_error_or_a_result():
    for cut in range(len(FATBIN)):
        _result_or_source_error(FATBIN[:cut])


def _tool(name: str) -> Path | None:
    found = shutil.which(name)
    if found:
        return Path(found)
    try:
        from tally.ptx.ptxas import find_ptxas

        sibling = find_ptxas().parent / name
        return sibling if sibling.is_file() else None
    except TallyError:
        return None


def test_real_fatbinary_tool(tmp_path):
    """The parser against fatbins CUDA's own `fatbinary` writes (skipped without the tool)."""
    fatbinary, ptxas = _tool("fatbinary"), _tool("ptxas")
    if fatbinary is None or ptxas is None:
        pytest.skip("fatbinary/ptxas not installed")
    (tmp_path / "k.ptx").write_text(PTX)
    subprocess.run([str(ptxas), "-arch=sm_90", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.ptx")],
                   check=True, capture_output=True, timeout=120)
    cubin = (tmp_path / "k.cubin").read_bytes()
    images = {"k.ptx": f"kind=ptx,sm=80,file={tmp_path / 'k.ptx'}",
              "k.cubin": f"kind=elf,sm=90,file={tmp_path / 'k.cubin'}"}
    built = {}
    for name, extra in [("plain", ["--compress=false"]), ("default", []),
                        ("lz4", ["--compress-all", "--compress-mode=speed"])]:
        out = tmp_path / f"{name}.fatbin"
        run = subprocess.run([str(fatbinary), "--64", f"--create={out}", *extra,
                              *(f"--image3={spec}" for spec in images.values())], capture_output=True, timeout=120)
        if run.returncode != 0:
            pytest.skip(f"fatbinary failed: {run.stderr.decode(errors='replace')[:200]}")
        built[name] = out.read_bytes()
    plain = fatbin_members(built["plain"])
    assert [(m.kind, m.arch, m.compressed) for m in plain] == [("ptx", 80, False), ("elf", 90, False)]
    assert plain[1].payload[:len(cubin)] == cubin
    result = ptx_sources(built["plain"])
    assert [s.origin for s in result.sources] == ["fatbin member sm_80"]
    # fatbinary drops the comments but keeps every kernel
    assert ptx_entries(result.sources[0].text) == ptx_entries(PTX)
    for name in ("default", "lz4"):
        members = fatbin_members(built[name])
        assert members[0].kind == "ptx" and members[0].compressed, name
        assert ptx_sources(built[name]).reason == REASON_COMPRESSED
    assert fatbin_members(built["lz4"])[0].compression == "lz4"


# ---------------------------------------------------------------- PTX images


def test_ptx_image():
    result = ptx_sources(PTX.encode() + b"\0")
    assert result.kind == "ptx" and [(s.origin, s.text) for s in result.sources] == [("ptx image", PTX)]


def test_non_utf8_ptx_image_is_a_reason():
    result = ptx_sources(b".version 8.4\n.target sm_90\n// \xff\xfe\n")
    assert result.sources == [] and "not UTF-8" in result.reason


def test_unknown_image():
    assert ptx_sources(b"MZ\x90\x00").reason == REASON_UNKNOWN


def test_ptx_entries():
    assert ptx_entries((CORPUS / "refused.ptx").read_text())[:2] == ["grid_sync", "cluster_exchange"]
    with pytest.raises(SourceError, match="not PTX"):
        ptx_entries("this is not ptx {")


# ---------------------------------------------------------------- Triton's cache


def _entry(root: Path, key: str, cubin: bytes, ptx: str | None, name: str = "kernel") -> Path:
    d = root / key
    d.mkdir(parents=True)
    (d / f"{name}.cubin").write_bytes(cubin)
    if ptx is not None:
        (d / f"{name}.ptx").write_text(ptx)
    (d / f"{name}.json").write_text("{}")
    return d


def test_triton_route_matches_content_not_size(tmp_path):
    root = tmp_path / "triton"
    decoy = bytes(reversed(ELF))  # same size, other bytes
    _entry(root, "aaaa", decoy, "// decoy ptx")  # sorts first: the size matches, the hash must not
    _entry(root, "bbbb", ELF, PTX)
    assert triton_ptx_for_cubin(ELF, [root]) == PTX
    assert triton_ptx_for_cubin(decoy, [root]) == "// decoy ptx"
    assert triton_ptx_for_cubin(ELF + b"x", [root]) is None
    assert triton_ptx_for_cubin(ELF, [tmp_path / "missing"]) is None
    result = ptx_sources(ELF, [root])
    assert result.kind == "elf" and [(s.origin, s.text) for s in result.sources] == [
        (f"triton cache {root / 'bbbb' / 'kernel.ptx'}", PTX)]
    assert ptx_sources(ELF, [tmp_path / "missing"]).reason.startswith(REASON_CUBIN_ONLY)


def test_triton_route_skips_an_entry_without_ptx(tmp_path):
    root = tmp_path / "triton"
    _entry(root, "aaaa", ELF, None)
    assert triton_ptx_for_cubin(ELF, [root]) is None
    _entry(root, "bbbb", ELF, PTX, name="other")
    os.utime(root, ns=(1, 1))  # a new entry changes the directory's mtime; make sure it does here
    assert triton_ptx_for_cubin(ELF, [root]) == PTX


def test_triton_index_is_lazy_and_reads_only_same_size_cubins(tmp_path, monkeypatch):
    root = tmp_path / "triton"
    for i in range(2000):
        d = root / f"{i:04d}"
        d.mkdir(parents=True)
        (d / "k.cubin").write_bytes(b"\x7fELF" + b"\0" * (i + 10 if i + 10 != len(ELF) - 4 else i + 5000))
    _entry(root, "zzzz", ELF, PTX)
    reads = []
    real_open = open
    monkeypatch.setattr(src, "open", lambda path, *a, **k: reads.append(path) or real_open(path, *a, **k),
                        raising=False)
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(src.os, "scandir", lambda p: scans.append(p) or real_scandir(p))
    assert triton_ptx_for_cubin(ELF, [root]) == PTX
    assert reads == [str(root / "zzzz" / "kernel.cubin")]
    first = len(scans)
    assert first == 2002  # the root and each entry, once
    for _ in range(5):
        assert triton_ptx_for_cubin(ELF, [root]) == PTX
        assert triton_ptx_for_cubin(b"\x7fELF not cached", [root]) is None
    assert len(scans) == first  # nothing changed: no rescans


def test_default_triton_cache_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "inductor" / "triton" / "0").mkdir(parents=True)
    assert src.default_triton_cache_dirs() == [tmp_path / "explicit", tmp_path / "home" / ".triton" / "cache",
                                               tmp_path / "inductor" / "triton" / "0"]
    monkeypatch.delenv("TRITON_CACHE_DIR")
    _entry(tmp_path / "home" / ".triton" / "cache", "k1", ELF, PTX)
    assert find_triton_ptx(ELF)[1] == PTX  # the default directories are searched
