"""Transformed kernels on disk, keyed by content hash, so a second run pays nothing.

Layout (version 1), under `<cache_dir>/kernels/v1/`:

    INDEX                      "tally-kernel-cache 1\\n": the layout's version marker
    <kk>/<key>.entry           one cached artifact (kk = the key's first two hex digits)

key = sha256 of the canonical JSON of [sha256(original PTX module), entry name,
mode, artifact, tally.ptx version]. `artifact` is "ptx" for transformed PTX
text (later: "cubin:<arch>:<ptxas version>" for compiled code). The tally.ptx
version is tally's version plus a hash of tally.ptx's own sources, so any
change to the transformer invalidates every entry it produced.

An entry file is one line of canonical JSON (the header) and the payload:

    {"artifact":..,"entry":..,"format":"tally-kernel-cache","key":..,"mode":..,
     "payload_bytes":N,"payload_sha256":..,"ptx_version":..,"reason":..|null,
     "source_sha256":..,"status":"ok"|"refused","version":1}\\n<N payload bytes>

Entries describe themselves completely, so there is no shared list to update
(concurrent writers never lose each other's work) and every hit is verified:
header fields equal to the request, the payload's length and sha256. Anything
else (truncated, bit-flipped, foreign, another version, a name that is not its
key) is ignored with one warning and overwritten by the recomputed entry. An
INDEX that is not ours (corrupt, foreign, another version) makes the whole
directory untrusted: one warning, and tally works without the cache (nothing
is read or written there) until `tally blocksched cache --clear`.
Writes are atomic (temporary file renamed into place). Refusals are cached
with their reason, so refused kernels cost nothing on later runs either.
"""
from __future__ import annotations

import functools
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tally.blocksched import _files
from tally.errors import TallyError
from tally.files import atomic_write
from tally.paths import cache_dir

FORMAT = "tally-kernel-cache"
VERSION = 1
INDEX_TEXT = f"{FORMAT} {VERSION}\n".encode()
MAX_ENTRY_BYTES = 256 << 20
MAX_HEADER_BYTES = 64 << 10
_HEADER_KEYS = {"artifact", "entry", "format", "key", "mode", "payload_bytes", "payload_sha256", "ptx_version",
                "reason", "source_sha256", "status", "version"}
_PTX_SOURCES = ("abi.py", "analysis.py", "parse.py", "transform.py")


@functools.lru_cache(maxsize=1)
def ptx_version() -> str:
    """tally's version and a hash of tally.ptx's sources: changes whenever the transformer may."""
    import tally
    import tally.ptx

    h = hashlib.sha256()
    root = Path(tally.ptx.__file__).resolve().parent
    for name in _PTX_SOURCES:
        h.update(name.encode() + b"\0")
        try:
            h.update((root / name).read_bytes())
        except OSError:
            h.update(b"<missing>")
        h.update(b"\0")
    return f"{tally.__version__}+{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class Request:
    source_sha256: str
    entry: str
    mode: str
    artifact: str = "ptx"
    ptx_version: str = ""

    @property
    def key(self) -> str:
        return _files.sha256_hex(_files.canonical_json(
            [self.source_sha256, self.entry, self.mode, self.artifact, self.ptx_version]))


def request_for(ptx_text: str | bytes, entry: str, mode: str, artifact: str = "ptx") -> Request:
    data = ptx_text.encode("utf-8", "surrogateescape") if isinstance(ptx_text, str) else bytes(ptx_text)
    return Request(hashlib.sha256(data).hexdigest(), entry, mode, artifact, ptx_version())


@dataclass(frozen=True)
class Cached:
    status: str  # "ok" | "refused"
    payload: bytes
    reason: str | None


class KernelRefused(TallyError):
    """tally.ptx will not transform this kernel in this mode (the reason is cached too)."""

    def __init__(self, reason: str, cache_hit: bool):
        super().__init__(reason)
        self.reason = reason
        self.cache_hit = cache_hit


class KernelCache:
    """The cache under `root` (default: <cache_dir>/kernels)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "kernels"
        self.dir = self.root / f"v{VERSION}"
        self._usable: bool | None = None

    # ---------------------------------------------------------------- index

    def usable(self) -> bool:
        """Whether this directory may be read and written (checked once per instance)."""
        if self._usable is None:
            self._usable = self._check_index()
        return self._usable

    def _check_index(self) -> bool:
        index = self.dir / "INDEX"
        try:
            data = _files.read_limited(index, 4096)
        except OSError as exc:
            _files.warn_once(f"cache:{self.dir}", f"kernel cache {self.dir} unreadable ({exc.strerror or exc}); "
                             "working without it")
            return False
        if data is None:
            try:
                atomic_write(index, INDEX_TEXT, "kernel cache index")
            except TallyError as exc:
                _files.warn_once(f"cache:{self.dir}", f"{exc}; working without the kernel cache")
                return False
            return True
        if data == INDEX_TEXT:
            return True
        first = data.split(b"\n", 1)[0][:80].decode("ascii", "replace")
        other = re.fullmatch(rb"tally-kernel-cache (0|[1-9][0-9]{0,9})\n", data)
        what = (f"is of another version ({first!r})" if other
                else "is not a tally kernel cache index (corrupt or foreign)")
        _files.warn_once(f"cache:{self.dir}", f"kernel cache index {index} {what}; the cache is ignored "
                         "(reset it with 'tally blocksched cache --clear')")
        return False

    # ---------------------------------------------------------------- entries

    def path(self, request: Request) -> Path:
        key = request.key
        return self.dir / key[:2] / f"{key}.entry"

    def get(self, request: Request) -> Cached | None:
        """The verified entry for `request`, or None (missing, or not trusted: one warning)."""
        if not self.usable():
            return None
        path = self.path(request)
        try:
            data = _files.read_limited(path, MAX_ENTRY_BYTES)
        except OSError as exc:
            _files.warn_once(f"entry:{path}", f"kernel cache entry {path} unreadable ({exc.strerror or exc}); ignored")
            return None
        if data is None:
            return None
        try:
            return _verify(data, request)
        except ValueError as exc:
            _files.warn_once(f"entry:{path}", f"kernel cache entry {path} is not trusted ({exc}); ignored")
            return None

    def put(self, request: Request, status: str, payload: bytes = b"", reason: str | None = None) -> bool:
        """Store an entry; False (after one warning) when the cache cannot be used."""
        if status not in ("ok", "refused") or (status == "refused") != (reason is not None):
            raise ValueError("an entry is ok with a payload or refused with a reason")
        if not self.usable():
            return False
        header = {"format": FORMAT, "version": VERSION, "key": request.key, "entry": request.entry,
                  "mode": request.mode, "artifact": request.artifact, "ptx_version": request.ptx_version,
                  "source_sha256": request.source_sha256, "status": status, "reason": reason,
                  "payload_bytes": len(payload), "payload_sha256": _files.sha256_hex(payload)}
        try:
            atomic_write(self.path(request), _files.canonical_json(header) + b"\n" + payload,
                         "kernel cache entry")
        except TallyError as exc:
            _files.warn_once(f"write:{self.dir}", f"{exc}; not cached")
            return False
        return True

    # ---------------------------------------------------------------- maintenance

    def stats(self) -> dict:
        """Entries by status and bytes on disk (entries are not verified here)."""
        out = {"ok": 0, "refused": 0, "other": 0, "bytes": 0}
        if not self.dir.is_dir():
            return out
        for path in self.dir.glob("??/*.entry"):
            try:
                out["bytes"] += path.stat().st_size
                with open(path, "rb") as f:
                    head = f.read(MAX_HEADER_BYTES).split(b"\n", 1)[0]
                status = _files.strict_json(head).get("status")
            except (OSError, ValueError, AttributeError):
                status = None
            out[status if status in ("ok", "refused") else "other"] += 1
        return out

    def clear(self) -> None:
        """Remove the whole kernel cache (every version)."""
        try:
            shutil.rmtree(self.root)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TallyError(f"cannot remove {self.root}: {exc.strerror or exc}") from None
        self._usable = None


def _verify(data: bytes, request: Request) -> Cached:
    header, header_bytes, payload = _files.json_head(data, "header", MAX_HEADER_BYTES)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("not a kernel cache entry")
    if header.get("version") != VERSION:
        raise ValueError(f"entry format version {header.get('version')!r}, this tally uses {VERSION}")
    if set(header) != _HEADER_KEYS:
        raise ValueError("header fields")
    if _files.canonical_json(header) != header_bytes:
        raise ValueError("header is not canonical")
    expected = {"key": request.key, "entry": request.entry, "mode": request.mode, "artifact": request.artifact,
                "ptx_version": request.ptx_version, "source_sha256": request.source_sha256}
    for name, value in expected.items():
        if header[name] != value:
            raise ValueError(f"its {name} is not the request's")
    status, reason = header["status"], header["reason"]
    if status == "ok":
        if reason is not None:
            raise ValueError("an ok entry with a reason")
    elif status == "refused":
        if not isinstance(reason, str) or not reason:
            raise ValueError("a refusal without a reason")
    else:
        raise ValueError("status")
    if type(header["payload_bytes"]) is not int or header["payload_bytes"] != len(payload):
        raise ValueError("payload length (truncated or extended)")
    if header["payload_sha256"] != _files.sha256_hex(payload):
        raise ValueError("payload checksum")
    if status == "refused" and payload:
        raise ValueError("a refusal with a payload")
    return Cached(status, payload, reason)


# -------------------------------------------------------------------- transformed PTX


def transformed_module(ptx_text: str, entry: str, mode: str, cache: KernelCache | None = None) -> tuple[str, bool]:
    """(the module with `entry`'s `mode` transformation added, cache_hit).

    A miss runs tally.ptx and stores the result; a refusal (including text that
    is not PTX or has no such entry) is stored with its reason and raised as
    KernelRefused, on later calls from the cache. A failure inside tally.ptx
    is raised as KernelRefused too but not cached."""
    from tally.ptx.analysis import MODES

    if mode not in MODES:
        raise TallyError(f"unknown transformation mode {mode!r} (expected one of {', '.join(MODES)})")
    cache = cache if cache is not None else KernelCache()
    request = request_for(ptx_text, entry, mode)
    hit = cache.get(request)
    if hit is not None:
        if hit.status == "refused":
            raise KernelRefused(hit.reason or "refused", True)
        try:
            return hit.payload.decode("utf-8"), True
        except UnicodeDecodeError:
            pass  # verified bytes that are not text: cannot have been written by us; recompute
    text, reason = _transform(ptx_text, entry, mode)
    if reason is not None:
        cache.put(request, "refused", reason=reason)
        raise KernelRefused(reason, False)
    cache.put(request, "ok", text.encode("utf-8", "surrogateescape"))
    return text, False


def _transform(ptx_text: str, entry: str, mode: str) -> tuple[str | None, str | None]:
    from tally.ptx.parse import parse
    from tally.ptx.transform import transform_module

    try:
        module = parse(ptx_text)
        module.entry(entry)  # a missing entry is a (cacheable) refusal
        result = transform_module(module, mode, [entry])
    except TallyError as exc:
        return None, str(exc)
    except Exception as exc:  # a defect in tally.ptx: run the original kernel, do not remember it
        raise KernelRefused(f"tally.ptx failed: {type(exc).__name__}: {exc}", False) from exc
    refused = result.entries[0].refusal
    return (None, refused) if refused else (result.text, None)


# -------------------------------------------------------------------- compiled cubins


def cubin_artifact(arch: str, ptxas_release: str) -> str:
    """The artifact name of a compiled module: it is only valid for one GPU architecture and as
    good as the assembler that made it, so both are in the key."""
    return f"cubin:{arch}:{ptxas_release}"


def compiled_module(ptx_text: str, entry: str, mode: str, arch: str = "sm_90", cache: KernelCache | None = None,
                    ptxas=None) -> tuple[bytes, bool]:
    """(the cubin of the module with `entry`'s `mode` transformation, cache_hit).

    The transformation comes from transformed_module (and its cache). A module that ptxas
    rejects after transformation is a transformation tally cannot vouch for: the rejection
    is cached as a refusal, with ptxas's first error line, and the original kernel runs."""
    from tally.ptx import ptxas as ptxas_mod

    cache = cache if cache is not None else KernelCache()
    binary = ptxas or ptxas_mod.find_ptxas()
    request = request_for(ptx_text, entry, mode, cubin_artifact(arch, ptxas_mod.ptxas_version(binary)))
    hit = cache.get(request)
    if hit is not None:
        if hit.status == "refused":
            raise KernelRefused(hit.reason or "refused", True)
        return hit.payload, True
    text, _ = transformed_module(ptx_text, entry, mode, cache)
    # Triton's sm_90a PTX is assembled for sm_90a on an sm_90 GPU; PTX for a newer GPU is refused
    target_arch, why = ptxas_mod.assembly_arch(ptxas_mod.module_target(ptx_text), arch)
    if target_arch is None:
        cache.put(request, "refused", reason=why)
        raise KernelRefused(why, False)
    result = ptxas_mod.assemble(text, target_arch, binary, keep_cubin=True)
    if not result.ok:
        first = next((line for line in result.errors.splitlines() if line.strip()), "no output")
        reason = f"ptxas rejected the transformed module: {first[:300]}"
        cache.put(request, "refused", reason=reason)
        raise KernelRefused(reason, False)
    cache.put(request, "ok", result.cubin)
    return result.cubin, False
