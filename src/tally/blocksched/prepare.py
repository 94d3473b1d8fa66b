"""Turn the code images the agent saved into transformed kernels, ahead of time.

`prepare(module_dir)` reads every `<16-hex FNV-1a-64>.img` the agent saved
(sorted by name), checks that the name is the hash of the bytes (an image
whose name does not match is skipped with a warning, never trusted), finds
the image's PTX (`tally.blocksched.sources`) and, for every kernel of every
PTX source and every mode, asks the kernel cache for the transformed module
(`tally.blocksched.cache.transformed_module`), which runs tally.ptx on a miss
and stores the result or the refusal. A second run over the same images is
therefore all cache hits.

Nothing is compiled here: ptxas output is not cached yet (the cache's
`cubin:<arch>:<ptxas version>` artifact is future work), so assembling on
every run would break "the second run pays nothing".

Every outcome is in the report (JSON-serializable, with a one-line-per-kernel
text form): an unreadable or corrupt image is a line, never a traceback.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tally import files
from tally.blocksched import _files
from tally.blocksched.cache import KernelCache, KernelRefused, compiled_module, transformed_module
from tally.blocksched.sources import SourceError, classify, ptx_entries, ptx_sources
from tally.errors import TallyError
from tally.ptx.analysis import MODES

FORMAT = "tally-prepare-report"
MAX_IMAGE_BYTES = 1 << 30
_NAME = re.compile(r"[0-9a-f]{16}")

fnv1a64 = files.fnv1a64  # the agent's image names (agent/modules.c)


def image_name(data: bytes) -> str:
    """The file name the agent gives an image: 16 lowercase hex digits of FNV-1a-64, '.img'."""
    return f"{fnv1a64(data):016x}.img"


@dataclass
class KernelResult:
    origin: str  # where the PTX came from (sources.PtxSource.origin)
    entry: str
    mode: str
    status: str  # "ok" | "refused"
    cache_hit: bool
    reason: str | None = None


@dataclass
class SourceReport:
    origin: str
    ptx_sha256: str
    entries: list[str]
    reason: str | None = None  # why no kernel of this source was tried (not PTX, no kernels)


@dataclass
class ImageReport:
    name: str
    bytes: int | None
    kind: str | None  # sources.classify, once the bytes are read and trusted
    status: str  # "ok" (PTX found), "no-ptx", "skipped" (not trusted), "error" (unreadable, corrupt)
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    sources: list[SourceReport] = field(default_factory=list)
    kernels: list[KernelResult] = field(default_factory=list)


@dataclass
class PrepareReport:
    module_dir: str
    modes: list[str]
    images: list[ImageReport] = field(default_factory=list)
    compiled_for: str | None = None  # the GPU architecture of the cached cubins, when compiled

    @property
    def kernels(self) -> list[KernelResult]:
        return [k for image in self.images for k in image.kernels]

    def summary(self) -> dict:
        kernels = self.kernels
        count = {s: sum(1 for i in self.images if i.status == s) for s in ("ok", "no-ptx", "skipped", "error")}
        return {"images": len(self.images), "images_with_ptx": count["ok"], "images_without_ptx": count["no-ptx"],
                "images_skipped": count["skipped"], "images_failed": count["error"],
                "kernels": len({(i.name, k.origin, k.entry) for i in self.images for k in i.kernels}),
                "transforms": len(kernels), "ok": sum(1 for k in kernels if k.status == "ok"),
                "refused": sum(1 for k in kernels if k.status == "refused"),
                "cache_hits": sum(1 for k in kernels if k.cache_hit)}

    @property
    def all_cache_hits(self) -> bool:
        return all(k.cache_hit for k in self.kernels)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "module_dir": self.module_dir, "modes": list(self.modes),
                "compiled_for": self.compiled_for, "summary": self.summary(),
                "images": [asdict(i) for i in self.images]}

    def lines(self) -> list[str]:
        """One line per kernel (image, PTX source, entry: every mode's outcome); one
        per image that gave no kernel; a summary line last."""
        out: list[str] = []
        for image in self.images:
            stem = image.name[:-4] if image.name.endswith(".img") else image.name
            if image.status in ("skipped", "error"):
                out.append(f"{stem}: {image.status}: {image.reason}")
                continue
            if image.status == "no-ptx":
                out.append(f"{stem} {image.kind}: no PTX: {image.reason}")
                continue
            for source in image.sources:
                if source.reason:
                    out.append(f"{stem} {source.origin}: {source.reason}")
                for entry in source.entries:
                    results = [k for k in image.kernels if k.origin == source.origin and k.entry == entry]
                    out.append(f"{stem} {source.origin}: {_short(entry)}: {_outcomes(results)}")
        s = self.summary()
        out.append(f"{s['images']} image(s): {s['images_with_ptx']} with PTX, {s['images_without_ptx']} without, "
                   f"{s['images_skipped']} skipped, {s['images_failed']} unreadable; {s['kernels']} kernel(s), "
                   f"{s['transforms']} transformation(s): {s['ok']} ok, {s['refused']} refused, "
                   f"{s['cache_hits']} from the cache"
                   + (f"; compiled for {self.compiled_for}" if self.compiled_for else ""))
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


def _short(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."


def _outcomes(results: list[KernelResult]) -> str:
    ok = [k.mode for k in results if k.status == "ok"]
    parts = [f"ok {','.join(ok)}"] if ok else []
    refusals: dict[str, list[str]] = {}
    for k in results:
        if k.status == "refused":
            refusals.setdefault(k.reason or "refused", []).append(k.mode)
    parts += [f"refused {','.join(modes)}: {reason}" for reason, modes in refusals.items()]
    hits = sum(1 for k in results if k.cache_hit)
    return "; ".join(parts) + f" (cached {hits}/{len(results)})"


def default_module_dir() -> Path:
    from tally.paths import cache_dir

    return cache_dir() / "modules"


def prepare(module_dir: Path | str, cache: KernelCache | None = None, modes=MODES,
            triton_dirs: list[Path | str] | None = None, compile_arch: str | None = None) -> PrepareReport:
    """Transform every kernel of every saved image in every mode, through the kernel cache.

    `triton_dirs`: where to look for the PTX of ELF images (default: Triton's
    and PyTorch Inductor's caches, see sources.default_triton_cache_dirs).
    `compile_arch` (e.g. "sm_90"): also assemble each transformation with ptxas
    and cache the cubin; "ok" then means the cubin exists, and a module ptxas
    rejects is refused. Without ptxas that is a TallyError, before any work.
    Raises TallyError for a missing module directory or an unknown mode; every
    per-image problem is in the report."""
    module_dir = Path(module_dir)
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise TallyError(f"unknown transformation mode {mode!r} (expected one of {', '.join(MODES)})")
    if not module_dir.is_dir():
        what = "is not a directory" if module_dir.exists() else "does not exist"
        raise TallyError(f"module directory {module_dir} {what} (the agent saves best-effort programs' "
                         "code images there)")
    cache = cache if cache is not None else KernelCache()
    ptxas = None
    if compile_arch is not None:
        from tally.ptx.ptxas import find_ptxas, ptxas_version

        if not re.fullmatch(r"sm_\d{2,3}[af]?", compile_arch):
            raise TallyError(f"--compile {compile_arch!r}: expected a GPU architecture like sm_90")
        ptxas = find_ptxas()
        ptxas_version(ptxas)  # a ptxas that cannot say its version cannot key the cache
    report = PrepareReport(str(module_dir), modes, compiled_for=compile_arch)
    try:
        paths = sorted(module_dir.glob("*.img"))
    except OSError as exc:
        raise TallyError(f"cannot list {module_dir}: {exc.strerror or exc}") from None
    for path in paths:
        report.images.append(_prepare_image(path, cache, modes, triton_dirs, compile_arch, ptxas))
    return report


def _prepare_image(path: Path, cache: KernelCache, modes: list[str], triton_dirs, compile_arch: str | None = None,
                   ptxas=None) -> ImageReport:
    image = ImageReport(path.name, None, None, "error")
    try:
        if not path.is_file():
            image.status, image.reason = "skipped", "not a regular file"
            return image
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        image.reason = f"unreadable: {exc.strerror or exc}"
        return image
    image.bytes = len(data)
    if len(data) > MAX_IMAGE_BYTES:
        image.bytes = None
        image.status, image.reason = "skipped", f"larger than {MAX_IMAGE_BYTES >> 20} MiB"
        return image
    stem = path.name[:-4]
    expected = f"{fnv1a64(data):016x}"
    if not _NAME.fullmatch(stem) or stem != expected:
        image.status = "skipped"
        image.reason = f"name is not the FNV-1a-64 of its bytes ({expected}); not trusted"
        _files.warn_once(f"prepare:{path}", f"{path}: {image.reason}; skipped")
        return image
    image.kind = classify(data)
    try:
        found = ptx_sources(data, triton_dirs)
    except SourceError as exc:
        image.reason = str(exc)
        return image
    except Exception as exc:  # a defect in tally, not in the image: report it, go on with the others
        image.reason = f"tally failed reading this image: {type(exc).__name__}: {exc}"
        return image
    image.notes = list(found.notes)
    if not found.sources:
        image.status, image.reason = "no-ptx", found.reason
        return image
    image.status = "ok"
    for source in found.sources:
        report = SourceReport(source.origin, hashlib.sha256(source.text.encode("utf-8", "surrogateescape")).hexdigest(),
                              [])
        image.sources.append(report)
        try:
            report.entries = ptx_entries(source.text)
        except SourceError as exc:
            report.reason = str(exc)
            continue
        except Exception as exc:  # tally.ptx defect
            report.reason = f"tally.ptx failed: {type(exc).__name__}: {exc}"
            continue
        if not report.entries:
            report.reason = "no kernels (.entry) in this module"
        for entry in report.entries:
            for mode in modes:
                try:
                    if compile_arch is not None:
                        _, hit = compiled_module(source.text, entry, mode, compile_arch, cache, ptxas)
                    else:
                        _, hit = transformed_module(source.text, entry, mode, cache)
                    result = KernelResult(source.origin, entry, mode, "ok", hit)
                except KernelRefused as exc:
                    result = KernelResult(source.origin, entry, mode, "refused", exc.cache_hit, exc.reason)
                image.kernels.append(result)
    return image
