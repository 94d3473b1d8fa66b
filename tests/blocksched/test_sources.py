"""PTX from saved code images: classification, fatbins, Triton's cache.

The synthetic fatbins below are built with the layout NVIDIA's fatbin uses as
far as public sources document it (reverse-engineered: n-eiling's
cuda-fatbin-decompression, the `fatbinary` Rust crate, nvopen-tools' format
notes) and as CUDA 13.0's `fatbinary` tool writes it:

    container: u32 magic 0xBA55ED50, u16 version 1, u16 header_size 16, u64 fat_size
    member:    u16 kind (1 PTX, 2 ELF), u16 0x0101, u32 header_size, u64 payload size,
               u32 compressed size at +16, u32 arch at +28, u64 flags at +40 (0x2000 LZ4,
               0x8000 zstd), u64 uncompressed size at +56 ...

Compressed members hold one zstd frame (0x8000) or one raw LZ4 block (0x2000)
in the first compressed-size bytes of the payload; the uncompressed size
counts a PTX text's terminating NUL. `test_real_fatbinary_tool` and
`test_real_compressed_fatbins` check all of this against fatbins the real tool
writes when it is installed; real images saved by the agent are checked on
the GPU machine.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tally.blocksched import sources as src
from tally.blocksched.sources import (REASON_CUBIN_ONLY, REASON_NEEDS_LZ4, REASON_NEEDS_ZSTD, REASON_UNKNOWN,
                                      SourceError, classify, fatbin_members, find_triton_ptx, ptx_entries,
                                      ptx_sources, triton_ptx_for_cubin)
from tally.errors import TallyError

CORPUS = Path(__file__).resolve().parents[1] / "ptx" / "corpus" / "cuda"
PTX = (CORPUS / "elementwise.ptx").read_text()
ELF = b"\x7fELF\x02\x01\x01\x41" + bytes(range(256)) * 4  # stands in for a cubin (only its bytes matter)
FLAGS = 0x11  # 64-bit, Linux: what fatbinary writes for uncompressed members
ZSTD, LZ4 = 0x8000, 0x2000


def member(kind: int, payload: bytes, arch: int = 80, flags: int = FLAGS, header_size: int | None = None,
           pad: bool = True, csize: int = 0, usize: int = 0) -> bytes:
    """One member: header (64 bytes, 80 for PTX as fatbinary writes it) then the payload, NUL-padded to 8.
    csize, usize: the compressed (+16) and uncompressed (+56) sizes, as fatbinary records them."""
    header_size = header_size if header_size is not None else (80 if kind == 1 else 64)
    if pad:
        payload = payload + b"\0" * (-len(payload) % 8)
    head = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x0101, header_size, len(payload), csize, 0x40 if kind == 1 else 0,
                       0, 9 if kind == 1 else 1, arch, 0, 0, flags, 0, usize)
    return head + b"\0" * (header_size - len(head)) + payload


def zstd_frame(raw: bytes, **params) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    if params:
        return zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
            3, **params)).compress(raw)
    return zstandard.ZstdCompressor().compress(raw)


def lz4_block(raw: bytes) -> bytes:
    return pytest.importorskip("lz4.block").compress(raw, store_size=False)


def compressed_member(kind: int, raw: bytes, compression: int, arch: int = 80, body: bytes | None = None,
                      usize: int | None = None) -> bytes:
    """A member as fatbinary writes a compressed one: the flag, the compressed size at +16, the size of
    `raw` at +56, the compressed bytes padded to 8 (PTX `raw` should end with its NUL, as the tool's)."""
    if body is None:
        body = zstd_frame(raw) if compression == ZSTD else lz4_block(raw)
    return member(kind, body, arch=arch, flags=FLAGS | compression, csize=len(body),
                  usize=len(raw) if usize is None else usize)


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


@pytest.mark.parametrize("flag, compression", [(LZ4, "lz4"), (ZSTD, "zstd")])
def test_compressed_ptx_and_elf_members_are_decompressed(flag, compression):
    data = container(compressed_member(1, PTX.encode() + b"\0", flag, arch=90),
                     compressed_member(2, ELF, flag, arch=90))
    ptx, elf = fatbin_members(data)
    assert ptx.compressed and ptx.compression == compression and ptx.reason is None and ptx.text == PTX
    assert ptx.uncompressed_size == len(PTX) + 1 and ptx.compressed_size < ptx.size
    assert elf.compressed and elf.text is None and elf.unpacked() == (ELF, None)
    result = ptx_sources(data)
    assert result.reason is None and [(s.origin, s.text) for s in result.sources] == [
        (f"fatbin member sm_90 ({compression})", PTX)]
    assert result.notes == [f"member 0: ptx sm_90 ({compression}-compressed)",
                            f"member 1: elf sm_90 ({compression}-compressed)"]
    assert ptx_entries(result.sources[0].text) == ["saxpy", "grid_ids_3d", "add_2d", "exit_early"]


@pytest.mark.parametrize("flag, compression, fragment", [
    (LZ4, "lz4", "LZ4 data is corrupt"),
    (ZSTD, "zstd", "zstd data is corrupt"),
])
def test_corrupt_compressed_members_are_a_reason(flag, compression, fragment):
    body = b"\x13\x0a\x01\x00 compressed bytes"
    data = container(member(1, body, flags=FLAGS | flag, csize=len(body), usize=100), ELF_MEMBER)
    ptx = fatbin_members(data)[0]
    assert ptx.compressed and ptx.compression == compression and ptx.text is None
    assert ptx.reason.startswith("PTX member sm_80: ") and fragment in ptx.reason
    result = ptx_sources(data)
    assert result.sources == [] and result.reason == ptx.reason and "\n" not in result.reason
    assert result.notes[0] == f"member 0: ptx sm_80 ({compression}-compressed; {ptx.reason})"


@pytest.mark.parametrize("flag", [ZSTD, LZ4])
def test_truncated_and_garbled_compressed_payloads_are_a_reason(flag):
    raw = PTX.encode() + b"\0"
    good = zstd_frame(raw) if flag == ZSTD else lz4_block(raw)
    for body in (good[:len(good) // 2], good[:4] + b"\xff" * (len(good) - 4)):
        result = ptx_sources(container(compressed_member(1, raw, flag, body=body)))
        assert result.sources == [] and result.reason.startswith("PTX member sm_80: "), body[:8]
    # Neither format as fatbinary writes it has a checksum: a changed literal byte decompresses to
    # other bytes of the right size. Here it is the PTX's last byte (its NUL in LZ4's last literals),
    # which the text check then refuses; a changed byte inside the text would go unnoticed.
    result = ptx_sources(container(compressed_member(1, raw, flag, body=good[:-1] + b"\xff")))
    assert result.sources == [] and result.reason


def test_a_zstd_frame_without_the_flag_is_still_compressed():
    frame = zstd_frame(PTX.encode() + b"\0")
    result = ptx_sources(container(member(1, frame, pad=False)))  # no flag, no recorded sizes
    assert [(s.origin, s.text) for s in result.sources] == [("fatbin member sm_80 (zstd)", PTX)]
    data = container(member(1, b"\x28\xb5\x2f\xfd" + b"\x01" * 40))
    assert fatbin_members(data)[0].compressed and "zstd data is corrupt" in ptx_sources(data).reason


@pytest.mark.parametrize("flag", [ZSTD, LZ4])
def test_a_size_that_does_not_match_the_recorded_one_is_a_reason(flag):
    raw = PTX.encode() + b"\0"
    for usize, fragment in [(len(raw) + 8, f"records {len(raw) + 8}"),  # decompresses to less
                            (len(raw) - 8, f"{len(raw) - 8}")]:  # would decompress to more
        result = ptx_sources(container(compressed_member(1, raw, flag, usize=usize)))
        assert result.sources == [] and fragment in result.reason, result.reason


def test_the_recorded_size_bounds_a_zstd_frame():
    raw = PTX.encode() + b"\0"
    declared = ptx_sources(container(compressed_member(1, raw, ZSTD, usize=100)))
    assert declared.reason == (f"PTX member sm_80: the zstd frame declares {len(raw)} bytes, "
                               f"more than the recorded size 100")
    # no content size in the frame: the streaming bound refuses it
    frame = zstd_frame(raw, write_content_size=0)
    streamed = ptx_sources(container(compressed_member(1, raw, ZSTD, body=frame, usize=100)))
    assert streamed.reason == "PTX member sm_80: the zstd data decompresses to more than the recorded size 100"
    # nothing recorded: decompressed up to MAX_DECOMPRESSED
    unrecorded = ptx_sources(container(compressed_member(1, raw, ZSTD, body=frame, usize=0)))
    assert [s.text for s in unrecorded.sources] == [PTX]


def test_a_truncated_zstd_frame_is_refused_without_a_recorded_size():
    # streaming stops quietly at the end of the input: the length is checked against the frame's
    # content size, or, without one, the frame is decoded once more in one shot, which refuses it
    raw = PTX.encode() + b"\0"
    for frame, fragment in [(zstd_frame(raw), "its frame declares"),
                            (zstd_frame(raw, write_content_size=0), "zstd data is corrupt")]:
        cut = frame[:len(frame) // 2]
        result = ptx_sources(container(member(1, cut, flags=FLAGS | ZSTD, csize=len(cut), usize=0)))
        assert result.sources == [] and fragment in result.reason, result.reason
    two = zstd_frame(raw, write_content_size=0) * 2  # fatbinary writes one frame; two are refused
    result = ptx_sources(container(member(1, two, flags=FLAGS | ZSTD, csize=len(two), usize=0)))
    assert result.sources == [] and "zstd data is corrupt" in result.reason


def test_the_1gib_limit_applies_without_a_recorded_size(monkeypatch):
    raw = PTX.encode() + b"\0"
    monkeypatch.setattr(src, "MAX_DECOMPRESSED", 1000)
    frame = zstd_frame(raw, write_content_size=0)
    result = ptx_sources(container(compressed_member(1, raw, ZSTD, body=frame, usize=0)))
    assert result.reason == "PTX member sm_80: the zstd data decompresses to more than the limit of 1000"
    for flag in (ZSTD, LZ4):  # a recorded size past the limit is refused before decompressing
        result = ptx_sources(container(compressed_member(1, raw, flag)))
        assert result.reason == f"PTX member sm_80: the header records {len(raw)} uncompressed bytes, " \
                                f"more than the limit of 1000"


def test_a_zstd_bomb_is_stopped_at_the_bound_without_the_memory():
    # 256 MiB of zeros in a few KiB: small window, no content size, so only the streaming bound stops it
    frame = zstd_frame(b"\0" * (256 << 20), window_log=17, write_content_size=0)
    assert len(frame) < 64 << 10
    data = container(member(1, frame, flags=FLAGS | ZSTD, csize=len(frame), usize=4 << 20))
    tracemalloc.start()
    try:
        result = ptx_sources(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.reason == f"PTX member sm_80: the zstd data decompresses to more than the recorded size {4 << 20}"
    assert peak < 16 << 20  # the 4 MiB bound and a chunk, not 256 MiB


def test_lz4_needs_a_recorded_size_that_lz4_can_reach():
    raw = PTX.encode() + b"\0"
    body = lz4_block(raw)
    missing = ptx_sources(container(compressed_member(1, raw, LZ4, usize=0)))
    assert missing.reason == "PTX member sm_80: an LZ4 member without a recorded uncompressed size"
    impossible = ptx_sources(container(compressed_member(1, raw, LZ4, usize=256 * len(body) + 1)))
    assert "more than LZ4 can encode" in impossible.reason


def test_a_compressed_size_past_the_payload_is_a_reason():
    raw = PTX.encode() + b"\0"
    good = bytearray(container(compressed_member(1, raw, ZSTD)))
    struct.pack_into("<I", good, 16 + 16, 1 << 20)  # the member's compressed size
    assert ptx_sources(bytes(good)).reason.startswith("PTX member sm_80: the header records 1048576 compressed bytes")


@pytest.mark.parametrize("flag, modules, reason", [(ZSTD, ["zstandard"], REASON_NEEDS_ZSTD),
                                                   (LZ4, ["lz4", "lz4.block"], REASON_NEEDS_LZ4)])
def test_a_missing_package_is_a_reason(monkeypatch, flag, modules, reason):
    raw = PTX.encode() + b"\0"
    data = container(compressed_member(1, raw, flag, arch=80), compressed_member(1, raw, flag, arch=90),
                     compressed_member(2, ELF, flag))
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    members = fatbin_members(data)
    assert [m.reason for m in members[:2]] == [reason, reason] and members[2].unpacked() == (None, reason)
    result = ptx_sources(data)
    assert result.sources == [] and result.reason == reason
    assert result.notes[0] == f"member 0: ptx sm_80 ({'zstd' if flag == ZSTD else 'lz4'}-compressed; {reason})"


def test_cubin_only_fatbin():
    result = ptx_sources(container(ELF_MEMBER, member(2, ELF, arch=80)))
    assert result.sources == [] and result.reason == REASON_CUBIN_ONLY


def test_a_fatbin_with_one_good_and_one_undecodable_ptx_member_gives_the_good_one():
    data = container(member(1, b"zzz", arch=90, flags=FLAGS | ZSTD), PTX_MEMBER)
    result = ptx_sources(data)
    assert [s.origin for s in result.sources] == ["fatbin member sm_80"]
    assert result.notes[0].startswith("member 0: ptx sm_90 (zstd-compressed; PTX member sm_90: zstd data is corrupt")


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


def _compressed_fatbin() -> bytes:
    raw = PTX.encode() + b"\0"
    return container(compressed_member(1, raw, ZSTD, arch=90), compressed_member(1, raw, LZ4, arch=80),
                     compressed_member(2, ELF, LZ4))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_compressed_fatbins_never_traceback(data):
    """Mutations that reach the decompressors: payload bytes, sizes, flags."""
    fatbin = bytearray(_compressed_fatbin())
    for offset, value in data.draw(st.lists(st.tuples(st.integers(0, len(fatbin) - 1), st.integers(0, 255)),
                                            max_size=8)):
        fatbin[offset] = value
    _result_or_source_error(bytes(fatbin))
    for m in fatbin_members(_compressed_fatbin()):
        mutated = bytearray(fatbin)
        struct.pack_into("<I", mutated, m.offset + 16, data.draw(st.integers(0, (1 << 32) - 1)))  # compressed size
        struct.pack_into("<Q", mutated, m.offset + 56, data.draw(st.sampled_from(  # uncompressed size
            [0, 1, m.uncompressed_size - 1, m.uncompressed_size + 1, 1 << 30, (1 << 30) + 1, (1 << 64) - 1])))
        _result_or_source_error(bytes(mutated))
        try:
            for each in fatbin_members(bytes(mutated)):
                content, why = each.unpacked()
                assert (content is None) != (why is None)
        except SourceError:
            pass


def test_every_truncation_is_an_error_or_a_result():
    for cut in range(len(FATBIN)):
        _result_or_source_error(FATBIN[:cut])
    compressed = _compressed_fatbin()
    for cut in range(len(compressed)):
        _result_or_source_error(compressed[:cut])


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


MODES = {  # fatbinary (CUDA 13.0) options -> how it stores (PTX, ELF)
    "plain": (["--compress=false"], (None, None)),
    "default": ([], ("zstd", None)),
    "size": (["--compress-all", "--compress-mode=size"], ("zstd", "zstd")),
    "speed": (["--compress-all", "--compress-mode=speed"], ("lz4", "lz4")),
}


@pytest.fixture(scope="module")
def fatbinary(tmp_path_factory):
    """build(ptx_text, mode) -> the fatbin CUDA's own `fatbinary` writes for that PTX (sm_80) and the
    cubin of PTX (sm_90); and that cubin. Skips without the tools."""
    tool, ptxas = _tool("fatbinary"), _tool("ptxas")
    if tool is None or ptxas is None:
        pytest.skip("fatbinary/ptxas not installed")
    d = tmp_path_factory.mktemp("fatbinary")
    (d / "k.ptx").write_text(PTX)
    subprocess.run([str(ptxas), "-arch=sm_90", "-o", str(d / "k.cubin"), str(d / "k.ptx")],
                   check=True, capture_output=True, timeout=120)
    counter = iter(range(1 << 30))

    def build(ptx: str, mode: str) -> bytes:
        n = next(counter)
        (d / f"in{n}.ptx").write_text(ptx)
        out = d / f"{n}-{mode}.fatbin"
        run = subprocess.run([str(tool), "--64", f"--create={out}", *MODES[mode][0],
                              f"--image3=kind=ptx,sm=80,file={d / f'in{n}.ptx'}",
                              f"--image3=kind=elf,sm=90,file={d / 'k.cubin'}"], capture_output=True, timeout=120)
        if run.returncode != 0:
            pytest.skip(f"fatbinary failed: {run.stderr.decode(errors='replace')[:200]}")
        return out.read_bytes()

    return build, (d / "k.cubin").read_bytes()


def test_real_fatbinary_tool(fatbinary):
    """The parser against fatbins CUDA's own `fatbinary` writes (skipped without the tool)."""
    build, cubin = fatbinary
    plain_image = build(PTX, "plain")
    plain = fatbin_members(plain_image)
    assert [(m.kind, m.arch, m.compressed) for m in plain] == [("ptx", 80, False), ("elf", 90, False)]
    assert plain[1].payload[:len(cubin)] == cubin
    result = ptx_sources(plain_image)
    assert [s.origin for s in result.sources] == ["fatbin member sm_80"]
    # fatbinary drops the comments and the indentation but keeps every kernel
    assert ptx_entries(result.sources[0].text) == ptx_entries(PTX)
    for mode in ("default", "size", "speed"):  # compressed: the same text as the uncompressed member
        compression = MODES[mode][1][0]
        found = ptx_sources(build(PTX, mode))
        assert [(s.origin, s.text) for s in found.sources] == [(f"fatbin member sm_80 ({compression})",
                                                                result.sources[0].text)], mode


@pytest.mark.parametrize("mode", list(MODES))
def test_real_compressed_fatbins(fatbinary, mode):
    """Round trips through the real tool in every compression mode: the header fields (+16 compressed
    size, +56 uncompressed size), the framing (one zstd frame / one raw LZ4 block), byte-exact output."""
    build, cubin = fatbinary
    # fatbinary normalizes PTX (drops comments and indentation) and is idempotent on its own output:
    # feed it normalized PTX, and the decompressed member must be that input byte for byte
    normalized = fatbin_members(build(PTX, "plain"))[0].text
    assert fatbin_members(build(normalized, "plain"))[0].text == normalized
    image = build(normalized, mode)
    ptx, elf = fatbin_members(image)
    assert (ptx.compression, elf.compression) == MODES[mode][1]
    assert ptx.text == normalized and ptx.reason is None
    assert elf.unpacked()[0][:len(cubin)] == cubin
    for m, raw_size in ((ptx, len(normalized.encode()) + 1), (elf, len(cubin))):  # PTX: the text and its NUL
        if m.compressed:
            assert m.uncompressed_size == raw_size and len(m.unpacked()[0]) == raw_size
            assert m.size == m.compressed_size + (-m.compressed_size % 8)  # the compressed bytes, padded to 8
            assert not any(m.payload[m.compressed_size:])
        else:
            assert (m.compressed_size, m.uncompressed_size) == (0, 0)
    if elf.compressed:
        assert elf.unpacked() == (cubin, None)
    result = ptx_sources(image)
    origin = "fatbin member sm_80" + (f" ({ptx.compression})" if ptx.compressed else "")
    assert [(s.origin, s.text) for s in result.sources] == [(origin, normalized)]
    if not ptx.compressed:
        return
    # corrupted: the compressed bytes cut short (the +16 field halved), and garbage after the first bytes
    start = ptx.offset + ptx.header_size
    short = bytearray(image)
    struct.pack_into("<I", short, ptx.offset + 16, ptx.compressed_size // 2)
    garbled = bytearray(image)
    garbled[start + 6:start + ptx.compressed_size] = b"\xff" * (ptx.compressed_size - 6)
    for bad in (short, garbled):
        result = ptx_sources(bytes(bad))
        assert result.sources == [] and result.reason.startswith("PTX member sm_80: "), result.reason
        assert ("zstd" if ptx.compression == "zstd" else "LZ4") in result.reason
    # the recorded size bounds the output: one byte less is refused
    bounded = bytearray(image)
    struct.pack_into("<Q", bounded, ptx.offset + 56, ptx.uncompressed_size - 1)
    result = ptx_sources(bytes(bounded))
    assert result.sources == [] and str(ptx.uncompressed_size - 1) in result.reason


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
