"""PTX for the code images a best-effort program loads: pure functions, no GPU.

The agent saves every image a best-effort program loads as
`<cache_dir>/modules/<16-hex FNV-1a-64 of the bytes>.img`. An image is one of

* PTX text (NUL-terminated, as `cuModuleLoadData` takes it);
* a fatbin: a container of PTX and ELF (cubin) members, one per architecture;
* an ELF cubin: Triton's kernels, and the cubin-only builds of PyTorch's own
  kernels (which have no PTX anywhere).

`ptx_sources(data)` returns the PTX texts an image yields, each with where it
came from, or the reason there is none. PTX comes from the image itself, from
a PTX member of a fatbin (decompressed when it is stored zstd- or
LZ4-compressed), or, for an ELF image, from Triton's on-disk cache
(`triton_ptx_for_cubin`): Triton keeps `<hash>/<kernel>.cubin` next to
`<kernel>.ptx`, and a cache entry whose cubin has exactly the image's bytes
(same size, same sha256) gives its sibling PTX. The match is on content,
never on names, so it cannot attach another kernel's PTX to an image.

The fatbin layout (little-endian), as public reverse-engineering documents it
and as CUDA 13.0's `fatbinary` writes it (checked by tests/blocksched/
test_sources.py when the tool is installed):

    container  u32 magic 0xBA55ED50 | u16 version (1) | u16 header_size (16) | u64 fat_size
               then fat_size bytes of members, back to back
    member     +0  u16 kind (1 = PTX, 2 = ELF)     +2  u16 (0x0101)
               +4  u32 header_size (64, 80, ...)   +8  u64 payload size (padded to 8)
               +16 u32 compressed size (the payload's bytes before the padding;
                   0 in uncompressed members)
               +28 u32 arch (80 = sm_80 / compute_80)
               +40 u64 flags (0x2000: LZ4-compressed, 0x8000: zstd-compressed)
               +56 u64 uncompressed size (0 in uncompressed members; PTX: the
                   text and its terminating NUL; ELF: the cubin's exact size)
               payload at member + header_size; the next member follows it

Only those fields are used; every offset and size is checked against the
buffer, and a container that does not add up raises SourceError.

Compressed members (CUDA 13's `fatbinary` compresses PTX with zstd by default;
`--compress-mode=speed` uses LZ4; `--compress-all` and `--compress-mode=size`
compress ELF too): the first compressed-size bytes of the payload are one zstd
frame (flag 0x8000) or one raw LZ4 block, without a size prefix or LZ4 frame
header (flag 0x2000). Both are decompressed with a hard bound: the recorded
uncompressed size (else, for zstd, MAX_DECOMPRESSED), and the result must have
exactly the recorded size. A member that cannot be decompressed (corrupt data,
a size that does not match, the zstandard or lz4 package not installed) gets a
one-line reason; it never raises. Those fields and framings were found, and are
checked, on fatbins CUDA 13.0's `fatbinary` (V13.0.88) writes in every
compression mode: the decompressed bytes equal the uncompressed member's byte
for byte. Neither format has a checksum as fatbinary writes it, so damaged
compressed bytes can decompress to other bytes of the right size.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from tally.errors import TallyError

FATBIN_MAGIC = 0xBA55ED50
FATBIN_VERSION = 1
CONTAINER_HEADER = struct.Struct("<IHHQ")  # magic, version, header_size, fat_size
MEMBER_MIN_HEADER = 64  # the smallest member header any documented fatbin has
KIND_PTX = 1
KIND_ELF = 2
FLAG_COMPRESSED_LZ4 = 0x2000
FLAG_COMPRESSED_ZSTD = 0x8000
MAX_DECOMPRESSED = 1 << 30  # the most any member may decompress to (bytes)
_LZ4_MAX_RATIO = 256  # an LZ4 block's output is at most 255 times its input (a match-length byte adds 255)
_READ_CHUNK = 1 << 20
_ZSTD_FRAME = b"\x28\xb5\x2f\xfd"
_ELF_MAGIC = b"\x7fELF"
_PTX_VERSION = re.compile(rb"(?m)^[ \t]*\.version[ \t]+\d+\.\d+")
_PTX_SNIFF_BYTES = 64 << 10

REASON_CUBIN_ONLY = "cubin only (no PTX in the image; PyTorch's own kernels are like this)"
REASON_NEEDS_ZSTD = "compressed fatbin member: needs the zstandard package"
REASON_NEEDS_LZ4 = "compressed fatbin member: needs the lz4 package"
REASON_UNKNOWN = "unknown image format"


class SourceError(TallyError):
    """An image that claims a format and does not follow it (one line)."""


# ---------------------------------------------------------------- classification


def classify(data: bytes) -> str:
    """"ptx", "fatbin", "elf" or "unknown", from the image's first bytes."""
    data = bytes(data)
    if len(data) >= 4 and struct.unpack_from("<I", data)[0] == FATBIN_MAGIC:
        return "fatbin"
    if data.startswith(_ELF_MAGIC):
        return "elf"
    text = data.rstrip(b"\0")
    if text and b"\0" not in text[:_PTX_SNIFF_BYTES] and _PTX_VERSION.search(text[:_PTX_SNIFF_BYTES]):
        return "ptx"
    return "unknown"


def _ptx_text(payload: bytes) -> tuple[str | None, str | None]:
    """(text, None) for NUL-padded UTF-8 PTX, else (None, why not)."""
    stripped = payload.rstrip(b"\0")
    if not stripped:
        return None, "empty"
    if stripped.startswith(_ZSTD_FRAME):
        return None, "compressed (a zstd frame)"
    if b"\0" in stripped:
        return None, "not text (NUL bytes inside)"
    try:
        return stripped.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start})"


# ---------------------------------------------------------------- fatbins


@dataclass(frozen=True)
class FatbinMember:
    """One member of a fatbin container."""

    index: int  # position in the image, counting across concatenated containers
    offset: int  # of the member's header in the image
    kind_code: int
    header_size: int
    size: int  # payload bytes, as the header says (padded)
    arch: int
    flags: int
    payload: bytes = field(repr=False)  # as stored (compressed members: compressed)
    text: str | None = field(default=None, repr=False)  # PTX members: the text, when readable
    reason: str | None = None  # PTX members without text: why
    compressed_size: int = 0  # +16: the compressed bytes at the start of the payload (0: not recorded)
    uncompressed_size: int = 0  # +56: the member's size once decompressed (0: not recorded)

    @property
    def kind(self) -> str:
        return {KIND_PTX: "ptx", KIND_ELF: "elf"}.get(self.kind_code, f"kind {self.kind_code}")

    @property
    def compressed(self) -> bool:
        return bool(self.flags & (FLAG_COMPRESSED_LZ4 | FLAG_COMPRESSED_ZSTD)) or self.payload.startswith(_ZSTD_FRAME)

    @property
    def compression(self) -> str | None:
        if self.flags & FLAG_COMPRESSED_ZSTD or (not self.flags & FLAG_COMPRESSED_LZ4
                                                 and self.payload.startswith(_ZSTD_FRAME)):
            return "zstd"
        return "lz4" if self.flags & FLAG_COMPRESSED_LZ4 else None

    @property
    def arch_name(self) -> str:
        return f"sm_{self.arch}"

    def describe(self) -> str:
        notes = [f"{self.compression}-compressed"] if self.compressed else []
        if self.reason:
            notes.append(self.reason)
        what = f"{self.kind} {self.arch_name}"
        return f"{what} ({'; '.join(notes)})" if notes else what

    def unpacked(self) -> tuple[bytes | None, str | None]:
        """(the member's bytes, None), decompressed when the member is stored
        compressed, or (None, why not) in one line: REASON_NEEDS_ZSTD /
        REASON_NEEDS_LZ4 when the package is not installed, else what is wrong
        with the data. Never raises. Uncompressed members give their payload
        (with its padding); PTX members are unpacked by fatbin_members, ELF
        members only when this is called."""
        if not self.compressed:
            return self.payload, None
        body = self.payload
        if self.compressed_size > len(body):
            return None, (f"the header records {self.compressed_size} compressed bytes, "
                          f"the payload has {len(body)}")
        if self.compressed_size:
            body = body[:self.compressed_size]  # the rest is padding, which neither format allows
        if self.uncompressed_size > MAX_DECOMPRESSED:
            return None, (f"the header records {self.uncompressed_size} uncompressed bytes, "
                          f"more than the limit of {MAX_DECOMPRESSED}")
        if self.compression == "zstd":
            return _zstd_decompress(body, self.uncompressed_size)
        return _lz4_decompress(body, self.uncompressed_size)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _zstd_decompress(body: bytes, recorded: int) -> tuple[bytes | None, str | None]:
    """One zstd frame (as fatbinary writes it), decompressed to at most
    `recorded` bytes (else MAX_DECOMPRESSED), streaming: the output never grows
    past the bound + 1 chunk, whatever the frame claims. The frame must be
    complete: streaming stops quietly at the end of a truncated frame, so the
    length is checked against the recorded size and the frame's own content
    size, and a frame with neither is decoded once more in one shot (bounded
    by what the first pass gave), which refuses an incomplete frame."""
    try:
        import zstandard
    except ImportError:
        return None, REASON_NEEDS_ZSTD
    bound = recorded or MAX_DECOMPRESSED
    limit = f"the recorded size {recorded}" if recorded else f"the limit of {MAX_DECOMPRESSED}"
    try:
        declared: int | None = zstandard.get_frame_parameters(body).content_size
    except Exception as exc:  # zstandard.ZstdError: not a zstd frame header
        return None, f"zstd data is corrupt ({_one_line(exc)})"
    if declared in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        declared = None
    if declared is not None and declared > bound:
        return None, f"the zstd frame declares {declared} bytes, more than {limit}"
    # The window (memory zstd allocates for a frame) is bounded too: a
    # single-segment frame's (fatbinary's) window is its content size.
    window = 1 << max(20, (bound - 1).bit_length())
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor(max_window_size=window).stream_reader(body, read_across_frames=True) as reader:
            while len(out) <= bound:
                chunk = reader.read(min(_READ_CHUNK, bound + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except Exception as exc:  # zstandard.ZstdError (corrupt data, too large a window), MemoryError
        return None, f"zstd data is corrupt ({_one_line(exc)})"
    if len(out) > bound:
        return None, f"the zstd data decompresses to more than {limit}"
    if declared is not None and len(out) != declared:
        return None, f"the zstd data decompresses to {len(out)} bytes, its frame declares {declared} (truncated?)"
    if recorded and len(out) != recorded:
        return None, f"the zstd data decompresses to {len(out)} bytes, the header records {recorded}"
    if declared is None and not recorded:
        try:  # one frame only (this one-shot call decodes the first frame and ignores the rest)
            again = zstandard.ZstdDecompressor(max_window_size=window).decompress(
                body, max_output_size=max(len(out), 1), allow_extra_data=False)
        except Exception as exc:  # zstandard.ZstdError: an incomplete frame
            return None, f"zstd data is corrupt ({_one_line(exc)})"
        if again != out:
            return None, "zstd data is corrupt (not one complete frame)"
    return bytes(out), None


def _lz4_decompress(body: bytes, recorded: int) -> tuple[bytes | None, str | None]:
    """One raw LZ4 block (no frame, no size prefix) of exactly `recorded` bytes."""
    try:
        import lz4.block
    except ImportError:
        return None, REASON_NEEDS_LZ4
    if not recorded:
        return None, "an LZ4 member without a recorded uncompressed size"
    if recorded > _LZ4_MAX_RATIO * len(body):
        return None, (f"the header records {recorded} uncompressed bytes, more than LZ4 "
                      f"can encode in {len(body)}")
    try:
        out = lz4.block.decompress(body, uncompressed_size=recorded)  # output capped at `recorded`
    except Exception as exc:  # lz4.block.LZ4BlockError (corrupt, or more than `recorded`), MemoryError
        return None, f"LZ4 data is corrupt or larger than the recorded size {recorded} ({_one_line(exc)})"
    if len(out) != recorded:
        return None, f"the LZ4 data decompresses to {len(out)} bytes, the header records {recorded}"
    return out, None


def fatbin_members(data: bytes) -> list[FatbinMember]:
    """The members of a fatbin image (concatenated containers included).

    Raises SourceError when the image is not a fatbin or does not add up: an
    unknown container version, a header or payload past the end of the
    container or of the buffer, bytes after the last container that are
    neither zero padding nor another container."""
    data = bytes(data)
    members: list[FatbinMember] = []
    pos = 0
    containers = 0
    while True:
        pos = _parse_container(data, pos, members)
        containers += 1
        rest = pos
        while rest < len(data) and data[rest] == 0:
            rest += 1
        if rest >= len(data):
            return members
        if rest + 4 <= len(data) and struct.unpack_from("<I", data, rest)[0] == FATBIN_MAGIC:
            pos = rest
            continue
        raise SourceError(f"malformed fatbin: {len(data) - pos} bytes after container {containers} "
                          f"(at offset {pos}) are not another container")


def _parse_container(data: bytes, start: int, members: list[FatbinMember]) -> int:
    if len(data) - start < CONTAINER_HEADER.size:
        raise SourceError(f"malformed fatbin: container header at offset {start} is truncated "
                          f"({len(data) - start} of {CONTAINER_HEADER.size} bytes)")
    magic, version, header_size, fat_size = CONTAINER_HEADER.unpack_from(data, start)
    if magic != FATBIN_MAGIC:
        raise SourceError(f"malformed fatbin: no fatbin magic at offset {start}")
    if version != FATBIN_VERSION:
        raise SourceError(f"malformed fatbin: container version {version} at offset {start} "
                          f"(only version {FATBIN_VERSION} is known)")
    if header_size < CONTAINER_HEADER.size:
        raise SourceError(f"malformed fatbin: container header size {header_size} at offset {start} "
                          f"(at least {CONTAINER_HEADER.size})")
    end = start + header_size + fat_size
    if end > len(data):
        raise SourceError(f"malformed fatbin: container at offset {start} needs {header_size + fat_size} bytes, "
                          f"the image has {len(data) - start} (truncated)")
    pos = start + header_size
    while pos < end:
        if end - pos < MEMBER_MIN_HEADER:
            if not any(data[pos:end]):
                break  # zero padding at the end of the container
            raise SourceError(f"malformed fatbin: {end - pos} bytes at offset {pos} are too short "
                              f"for a member header ({MEMBER_MIN_HEADER})")
        kind, _, member_header, size = struct.unpack_from("<HHIQ", data, pos)
        if member_header == 0 and not any(data[pos:end]):
            break  # zero padding
        if member_header < MEMBER_MIN_HEADER:
            raise SourceError(f"malformed fatbin: member header size {member_header} at offset {pos} "
                              f"(at least {MEMBER_MIN_HEADER})")
        payload_start = pos + member_header
        payload_end = payload_start + size
        if payload_end > end:
            raise SourceError(f"malformed fatbin: member at offset {pos} ends at {payload_end}, "
                              f"past its container's end {end}")
        (compressed_size,) = struct.unpack_from("<I", data, pos + 16)
        (arch,) = struct.unpack_from("<I", data, pos + 28)
        (flags,) = struct.unpack_from("<Q", data, pos + 40)
        (uncompressed_size,) = struct.unpack_from("<Q", data, pos + 56)
        payload = data[payload_start:payload_end]
        member = FatbinMember(len(members), pos, kind, member_header, size, arch, flags, payload,
                              compressed_size=compressed_size, uncompressed_size=uncompressed_size)
        if kind == KIND_PTX:
            content, why = member.unpacked()
            if content is None:
                if why not in (REASON_NEEDS_ZSTD, REASON_NEEDS_LZ4):
                    why = f"PTX member {member.arch_name}: {why}"
                member = replace(member, reason=why)
            else:
                text, why = _ptx_text(content)
                member = replace(member, text=text,
                                 reason=None if why is None else f"PTX member {member.arch_name} is {why}")
        members.append(member)
        pos = payload_end
    return end


# ---------------------------------------------------------------- Triton's cache


def default_triton_cache_dirs() -> list[Path]:
    """Where Triton keeps compiled kernels: $TRITON_CACHE_DIR, else
    $TRITON_HOME/.triton/cache (default ~/.triton/cache); and PyTorch
    Inductor's per-device Triton caches ($TORCHINDUCTOR_CACHE_DIR, default
    <tmp>/torchinductor_<user>, then triton/<device>)."""
    dirs: list[Path] = []
    explicit = os.environ.get("TRITON_CACHE_DIR", "").strip()
    if explicit:
        dirs.append(Path(explicit))
    home = os.environ.get("TRITON_HOME", "").strip()
    try:
        dirs.append(Path(home or Path.home()) / ".triton" / "cache")
    except RuntimeError:  # no home directory
        pass
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").strip()
    if not inductor:
        try:
            import getpass

            user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
            inductor = str(Path(tempfile.gettempdir()) / f"torchinductor_{user}")
        except Exception:  # getuser() raises when there is no user name at all
            inductor = ""
    if inductor:
        try:
            dirs.extend(sorted(p for p in (Path(inductor) / "triton").iterdir() if p.is_dir()))
        except OSError:
            pass
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


@dataclass
class _DirIndex:
    mtime_ns: int | None = None  # of the cache directory when last scanned
    subdirs: dict[str, tuple[int, list[tuple[int, str]]]] = field(default_factory=dict)  # name -> (mtime, [(size, path)])
    by_size: dict[int, list[str]] = field(default_factory=dict)


_index: dict[str, _DirIndex] = {}
_index_lock = threading.Lock()


def clear_triton_index() -> None:
    """Forget what this process has indexed (tests; a long-running process after a cleanup)."""
    with _index_lock:
        _index.clear()


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _refresh(root: str, index: _DirIndex) -> None:
    """Rescan the entries of `root` whose directory changed since the last scan
    (one listing of root plus one stat per entry; unchanged entries are not listed)."""
    index.mtime_ns = _mtime_ns(root)
    seen: dict[str, tuple[int, list[tuple[int, str]]]] = {}
    try:
        with os.scandir(root) as entries:
            subdirs = [(e.name, e.path, e.stat().st_mtime_ns) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        subdirs = []
    for name, path, mtime in subdirs:
        known = index.subdirs.get(name)
        if known is not None and known[0] == mtime:
            seen[name] = known
            continue
        cubins: list[tuple[int, str]] = []
        try:
            with os.scandir(path) as files:
                for f in files:
                    if f.name.endswith(".cubin") and f.is_file(follow_symlinks=False):
                        cubins.append((f.stat().st_size, f.path))
        except OSError:
            pass
        seen[name] = (mtime, cubins)
    index.subdirs = seen
    by_size: dict[int, list[str]] = {}
    for _, cubins in seen.values():
        for size, path in cubins:
            by_size.setdefault(size, []).append(path)
    for paths in by_size.values():
        paths.sort()
    index.by_size = by_size


def find_triton_ptx(data: bytes, cache_dirs: list[Path | str] | None = None) -> tuple[Path, str] | None:
    """(path of the .ptx, its text) for the Triton cache entry whose `.cubin` has
    exactly `data`'s bytes, or None. See `triton_ptx_for_cubin`."""
    data = bytes(data)
    dirs = default_triton_cache_dirs() if cache_dirs is None else [Path(d) for d in cache_dirs]
    digest = hashlib.sha256(data).digest()
    for d in dirs:
        root = str(d)
        with _index_lock:
            index = _index.get(root)
            fresh = index is None
            if fresh:
                index = _index[root] = _DirIndex()
                _refresh(root, index)
            candidates = list(index.by_size.get(len(data), ()))
        found = _match(data, digest, candidates)
        if found is None and not fresh and _mtime_ns(root) != index.mtime_ns:
            with _index_lock:  # something was added since the last scan: look at what changed
                _refresh(root, index)
                candidates = list(index.by_size.get(len(data), ()))
            found = _match(data, digest, candidates)
        if found is not None:
            return found
    return None


def _match(data: bytes, digest: bytes, candidates: list[str]) -> tuple[Path, str] | None:
    for path in candidates:
        try:
            with open(path, "rb") as f:
                candidate = f.read(len(data) + 1)
        except OSError:
            continue
        if len(candidate) != len(data) or hashlib.sha256(candidate).digest() != digest:
            continue
        ptx = Path(path).with_suffix(".ptx")
        try:
            text = ptx.read_bytes().rstrip(b"\0").decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # another entry may hold the same cubin with a readable PTX
        return ptx, text
    return None


def triton_ptx_for_cubin(data: bytes, cache_dirs: list[Path | str] | None = None) -> str | None:
    """The PTX Triton compiled into this exact cubin, from Triton's on-disk cache.

    Triton's cache (`$TRITON_CACHE_DIR`, default `~/.triton/cache`; PyTorch
    Inductor keeps its own under `<tmp>/torchinductor_<user>/triton/<device>`,
    see `default_triton_cache_dirs`) holds one directory per compiled kernel
    with `<kernel>.cubin` next to `<kernel>.ptx`. This finds a `.cubin` whose
    bytes equal `data` exactly (size first, from an index of sizes; then
    sha256) and returns its sibling `.ptx`. The match is on content, so it
    cannot attach the wrong PTX: a cache entry for another kernel, or another
    build of the same kernel, has other bytes.

    The index (sizes of every `*/*.cubin`) is built lazily, once per process
    and directory; a lookup whose size is not indexed rescans only when the
    directory changed, and then lists only the entries that changed, so
    thousands of cache entries cost one listing and one stat each, once."""
    found = find_triton_ptx(data, cache_dirs)
    return found[1] if found else None


# ---------------------------------------------------------------- PTX of an image


@dataclass(frozen=True)
class PtxSource:
    origin: str  # "ptx image", "fatbin member sm_XX" (+ " (zstd)" / " (lz4)" if decompressed), "triton cache <path>"
    text: str


@dataclass(frozen=True)
class SourceResult:
    kind: str  # classify(data)
    sources: list[PtxSource]
    reason: str | None  # why there is no PTX (None when sources is not empty)
    notes: list[str] = field(default_factory=list)  # e.g. the fatbin's members


def ptx_sources(data: bytes, triton_dirs: list[Path | str] | None = None) -> SourceResult:
    """The PTX texts this image yields, with their origin, or the reason there is none.

    Raises SourceError for a fatbin that does not add up (see fatbin_members);
    every other image gives a result."""
    data = bytes(data)
    kind = classify(data)
    if kind == "ptx":
        text, why = _ptx_text(data)
        if text is None:
            return SourceResult(kind, [], f"PTX image is {why}")
        return SourceResult(kind, [PtxSource("ptx image", text)], None)
    if kind == "elf":
        found = find_triton_ptx(data, triton_dirs)
        if found:
            return SourceResult(kind, [PtxSource(f"triton cache {found[0]}", found[1])], None)
        return SourceResult(kind, [], REASON_CUBIN_ONLY + "; no Triton cache entry has this cubin")
    if kind == "fatbin":
        members = fatbin_members(data)
        notes = [f"member {m.index}: {m.describe()}" for m in members]
        sources = [PtxSource(f"fatbin member {m.arch_name}" + (f" ({m.compression})" if m.compressed else ""),
                             m.text)
                   for m in members if m.kind_code == KIND_PTX and m.text is not None]
        if sources:
            return SourceResult(kind, sources, None, notes)
        ptx = [m for m in members if m.kind_code == KIND_PTX]
        if ptx:
            reason = "; ".join(dict.fromkeys(m.reason or "unreadable PTX member" for m in ptx))
        elif any(m.kind_code == KIND_ELF for m in members):
            reason = REASON_CUBIN_ONLY
        elif members:
            reason = "fatbin without PTX or ELF members"
        else:
            reason = "empty fatbin"
        return SourceResult(kind, [], reason, notes)
    return SourceResult(kind, [], REASON_UNKNOWN)


def ptx_entries(ptx_text: str) -> list[str]:
    """The names of the module's kernels (`.entry` with a body), in order.
    Raises SourceError (tally.ptx's one-line reason) for text that is not PTX."""
    from tally.ptx.parse import parse

    try:
        return [f.name for f in parse(ptx_text).entries]
    except TallyError as exc:
        raise SourceError(str(exc)) from None
