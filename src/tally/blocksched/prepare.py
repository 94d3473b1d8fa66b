"""Turn the code images the agent saved into transformed kernels, ahead of time.

`prepare(module_dir)` reads every `<16-hex FNV-1a-64>.img` the agent saved
(sorted by name), checks that the name is the hash of the bytes (an image
whose name does not match is skipped with a warning, never trusted), finds
the image's PTX (`tally.blocksched.sources`) and transforms every kernel of
every PTX source in every mode, through the kernel cache.

The work is per module, not per kernel: each PTX source is parsed once, all
of its entries are transformed in one mode in one pass of tally.ptx (an entry
tally.ptx refuses is reported and left out; it never makes the others fail),
and with `compile_arch` the transformed module is assembled by ptxas once per
mode. The cache holds one entry per (module, mode) and artifact
("module-ptx", "module-cubin:<arch>:<ptxas release>"), keyed by the module's
content, whose payload records every entry's outcome; a second run over the
same images is therefore all cache hits and runs neither tally.ptx nor ptxas.

With `compile_arch`, the PTX sources of an image compete: each kernel comes
from the source that matches the architecture best (`ptxas.assembly_arch`;
the same architecture, else the highest one below it), as the driver would
choose, and `plan_path` also writes the block-level plan (tally.blocksched.plan)
with the cubins it names.

Every outcome is in the report (JSON-serializable, with a one-line-per-kernel
text form): an unreadable or corrupt image is a line, never a traceback.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tally import files
from tally.blocksched import _files
from tally.blocksched.cache import KernelCache, Request, ptx_version
from tally.blocksched.sources import SourceError, classify, ptx_sources
from tally.errors import TallyError
from tally.ptx.analysis import MODES

FORMAT = "tally-prepare-report"
MAX_IMAGE_BYTES = 1 << 30
MAX_PTXAS_RETRIES = 8  # entries dropped one by one from a module ptxas rejects, then the rest is refused
_NAME = re.compile(r"[0-9a-f]{16}")
MODULE_ENTRY = "*"  # the cache request's entry for a whole module (no PTX identifier is "*")
_PAYLOAD_FORMAT = "tally-module-result"

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
    reason: str | None = None  # why no kernel (or not every kernel) of this source was tried
    target: str | None = None  # the module's .target
    globals: list[str] = field(default_factory=list)  # module-scope .global/.const variables
    externs: list[str] = field(default_factory=list)  # declared, not defined, functions (.extern .func)


@dataclass
class PlanKernel:
    """One kernel's place in the block-level plan: included, or excluded and why."""
    image: str  # the image's 16-hex name
    origin: str
    entry: str
    nparams: int
    included: bool
    reason: str | None = None
    cubin_fnv: str | None = None
    cubin: str | None = None


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
    plan: str | None = None  # the block-level plan written, when one was
    plan_kernels: list[PlanKernel] = field(default_factory=list)  # with compile_arch and mode slice

    @property
    def kernels(self) -> list[KernelResult]:
        return [k for image in self.images for k in image.kernels]

    def summary(self) -> dict:
        kernels = self.kernels
        count = {s: sum(1 for i in self.images if i.status == s) for s in ("ok", "no-ptx", "skipped", "error")}
        out = {"images": len(self.images), "images_with_ptx": count["ok"], "images_without_ptx": count["no-ptx"],
               "images_skipped": count["skipped"], "images_failed": count["error"],
               "kernels": len({(i.name, k.origin, k.entry) for i in self.images for k in i.kernels}),
               "transforms": len(kernels), "ok": sum(1 for k in kernels if k.status == "ok"),
               "refused": sum(1 for k in kernels if k.status == "refused"),
               "cache_hits": sum(1 for k in kernels if k.cache_hit)}
        if self.plan_kernels:
            out["plan_kernels"] = sum(1 for k in self.plan_kernels if k.included)
            out["plan_excluded"] = sum(1 for k in self.plan_kernels if not k.included)
        return out

    @property
    def all_cache_hits(self) -> bool:
        return all(k.cache_hit for k in self.kernels)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "module_dir": self.module_dir, "modes": list(self.modes),
                "compiled_for": self.compiled_for, "plan": self.plan, "summary": self.summary(),
                "images": [asdict(i) for i in self.images],
                "plan_kernels": [asdict(k) for k in self.plan_kernels]}

    def lines(self) -> list[str]:
        """One line per kernel (image, PTX source, entry: every mode's outcome); one
        per image that gave no kernel; one per kernel left out of the plan; a summary line last."""
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
                    if results:
                        out.append(f"{stem} {source.origin}: {_short(entry)}: {_outcomes(results)}")
        for k in self.plan_kernels:
            if not k.included:
                out.append(f"{k.image} {k.origin}: {_short(k.entry)}: not in the plan: {k.reason}")
        s = self.summary()
        line = (f"{s['images']} image(s): {s['images_with_ptx']} with PTX, {s['images_without_ptx']} without, "
                f"{s['images_skipped']} skipped, {s['images_failed']} unreadable; {s['kernels']} kernel(s), "
                f"{s['transforms']} transformation(s): {s['ok']} ok, {s['refused']} refused, "
                f"{s['cache_hits']} from the cache"
                + (f"; compiled for {self.compiled_for}" if self.compiled_for else ""))
        if self.plan:
            line += (f"; plan {self.plan}: {s.get('plan_kernels', 0)} kernel(s), "
                     f"{s.get('plan_excluded', 0)} left out")
        out.append(line)
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


def parse_modes(text: str) -> list[str]:
    """'slice' or 'slice,ptb' -> the modes; TallyError for an unknown or repeated one."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise TallyError(f"--modes: expected one or more of {', '.join(MODES)}, separated by commas")
    for mode in modes:
        if mode not in MODES:
            raise TallyError(f"unknown transformation mode {mode!r} (expected one of {', '.join(MODES)})")
    if len(set(modes)) != len(modes):
        raise TallyError(f"--modes {text!r} names a mode twice")
    return modes


def prepare(module_dir: Path | str, cache: KernelCache | None = None, modes=MODES,
            triton_dirs: list[Path | str] | None = None, compile_arch: str | None = None,
            plan_path: Path | str | None = None) -> PrepareReport:
    """Transform every kernel of every saved image in every mode, through the kernel cache.

    `triton_dirs`: where to look for the PTX of ELF images (default: Triton's
    and PyTorch Inductor's caches, see sources.default_triton_cache_dirs).
    `compile_arch` (e.g. "sm_90"): also assemble each transformed module with ptxas
    and cache the cubin; "ok" then means the cubin exists, and an entry ptxas
    rejects is refused. Without ptxas that is a TallyError, before any work.
    `plan_path` (with `compile_arch` and mode slice): write the block-level plan
    there, and its cubins under `<plan dir>/cubins/`.
    Raises TallyError for a missing module directory or an unknown mode; every
    per-image problem is in the report."""
    module_dir = Path(module_dir)
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise TallyError(f"unknown transformation mode {mode!r} (expected one of {', '.join(MODES)})")
    if plan_path is not None:
        if compile_arch is None:
            raise TallyError("a block-level plan needs compiled kernels (--compile ARCH)")
        if "slice" not in modes:
            raise TallyError("a block-level plan needs mode slice")
    if not module_dir.is_dir():
        what = "is not a directory" if module_dir.exists() else "does not exist"
        raise TallyError(f"module directory {module_dir} {what} (the agent saves best-effort programs' "
                         "code images there)")
    cache = cache if cache is not None else KernelCache()
    ptxas = release = None
    if compile_arch is not None:
        from tally.ptx.ptxas import find_ptxas, ptxas_version

        if not re.fullmatch(r"sm_\d{2,3}[af]?", compile_arch):
            raise TallyError(f"--compile {compile_arch!r}: expected a GPU architecture like sm_90")
        ptxas = find_ptxas()
        release = ptxas_version(ptxas)  # a ptxas that cannot say its version cannot key the cache
    report = PrepareReport(str(module_dir), modes, compiled_for=compile_arch)
    try:
        paths = sorted(module_dir.glob("*.img"))
    except OSError as exc:
        raise TallyError(f"cannot list {module_dir}: {exc.strerror or exc}") from None
    run = _Run(cache, modes, triton_dirs, compile_arch, ptxas, release)
    try:
        for path in paths:
            report.images.append(run.image(path))
        for finish in run.finish:
            finish()
    finally:
        if run.pool is not None:
            run.pool.shutdown(cancel_futures=True)
    if compile_arch is not None and "slice" in modes:
        report.plan_kernels = run.plan
    if plan_path is not None:
        report.plan = str(_write_plan(Path(plan_path), run, compile_arch, release))
    return report


def _write_plan(path: Path, run: "_Run", arch: str, release: str) -> Path:
    import tally
    from tally.blocksched import plan as planmod

    directory = planmod.cubin_dir(path)
    entries = []
    for k in run.plan:
        if not k.included:
            continue
        fnv, cubin_path = planmod.write_cubin(directory, run.cubins[id(k)])
        k.cubin_fnv, k.cubin = fnv, str(cubin_path)
        entries.append(planmod.PlanEntry(k.image, k.entry, k.nparams, fnv, str(cubin_path)))
    comments = [f"tally {tally.__version__}, compiled for {arch} by ptxas {release}",
                "slice <image fnv> <entry> <nparams> <cubin fnv> <cubin path>"]
    return planmod.write_plan(path, entries, comments)


# ------------------------------------------------------------------ one run


@dataclass
class _Outcome:
    """Every entry's outcome for one (module, mode): ok (in the text or cubin) or refused with a reason."""
    ok: list[str]
    refused: dict[str, str]
    cacheable: bool = True  # False when a defect of tally.ptx (not the module) refused something


class _Run:
    def __init__(self, cache: KernelCache, modes: list[str], triton_dirs, compile_arch: str | None, ptxas,
                 release: str | None):
        self.cache, self.modes, self.triton_dirs = cache, modes, triton_dirs
        self.compile_arch, self.ptxas, self.release = compile_arch, ptxas, release
        self.plan: list[PlanKernel] = []
        self.cubins: dict[int, bytes] = {}  # id(PlanKernel) -> its module's slice cubin
        self.finish: list = []  # per source, in order: fills the report once its results are in
        self.pool = None
        if compile_arch is not None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1)),
                                           thread_name_prefix="tally-ptxas")

    # -------------------------------------------------------------- an image

    def image(self, path: Path) -> ImageReport:
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
            found = ptx_sources(data, self.triton_dirs)
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
        parsed = []  # (source, report, module or None)
        for source in found.sources:
            data_text = source.text.encode("utf-8", "surrogateescape")
            report = SourceReport(source.origin, hashlib.sha256(data_text).hexdigest(), [])
            image.sources.append(report)
            parsed.append((source, report, self._parse(source.text, report)))
        chosen = self._choose(parsed, stem)
        for index, (_, report, module) in enumerate(parsed):
            names = chosen.get(index, [])
            if module is None or not names:
                continue
            self._source(image, stem, report, module, names)
        return image

    def _parse(self, text: str, report: SourceReport):
        from tally.ptx.parse import parse
        from tally.ptx.ptxas import module_target

        try:
            module = parse(text)
            report.entries = [f.name for f in module.entries]
            report.target = module_target(text)
            report.globals = referenced_globals(module, module_globals(module))
            # what makes ptxas.assemble build relocatable code (-c), which cuModuleLoadData does not load
            report.externs = list(dict.fromkeys(re.findall(r"^\s*\.extern\s+\.func\s*(?:\([^)]*\)\s*)?([\w$]+)",
                                                           text, re.M)))
        except TallyError as exc:
            report.reason = str(exc)
            return None
        except Exception as exc:  # tally.ptx defect
            report.reason = f"tally.ptx failed: {type(exc).__name__}: {exc}"
            return None
        if not report.entries:
            report.reason = "no kernels (.entry) in this module"
        return module

    def _choose(self, parsed, stem: str) -> dict[int, list[str]]:
        """index of a source in `parsed` -> the entries to prepare from it. Without an
        architecture, all of them; with one, each entry from the source that matches it best
        (sources that cannot run on it give none, and say why)."""
        if self.compile_arch is None:
            return {i: list(report.entries) for i, (_, report, module) in enumerate(parsed) if module is not None}
        from tally.ptx.ptxas import assembly_arch

        ranked, unusable = [], []
        for index, (_, report, module) in enumerate(parsed):
            if module is None:
                continue
            why = assembly_arch(report.target, self.compile_arch)[1]
            if why is not None:
                report.reason = f"not used: {why}"
                unusable.append((report, module, why))
                continue
            target = report.target or ""
            number = int(re.match(r"sm_(\d+)", target).group(1)) if target else 0
            ranked.append(((number, target == self.compile_arch, target[-1:] in ("a", "f"), -index), index))
        ranked.sort(reverse=True)
        owner: dict[str, int] = {}
        for _, index in ranked:
            for name in parsed[index][1].entries:
                owner.setdefault(name, index)
        chosen: dict[int, list[str]] = {}
        for _, index in ranked:
            report = parsed[index][1]
            mine = [name for name in report.entries if owner[name] == index]
            chosen[index] = mine
            others = sorted({parsed[owner[n]][1].origin for n in report.entries if owner[n] != index})
            if others and not report.reason:
                what = "not used" if not mine else f"{len(report.entries) - len(mine)} kernel(s) not used"
                report.reason = f"{what}: {', '.join(others)} matches {self.compile_arch} better"
        if "slice" in self.modes:  # kernels no usable source has: left out of the plan, with the reason
            left: set[str] = set()
            for report, module, why in unusable:
                for f in module.entries:
                    if f.name not in owner and f.name not in left:
                        left.add(f.name)
                        self.plan.append(PlanKernel(stem, report.origin, f.name, len(f.params), False, why))
        return chosen

    # -------------------------------------------------------------- a module

    def _source(self, image: ImageReport, stem: str, report: SourceReport, module, names: list[str]):
        from tally.ptx.ptxas import assembly_arch

        wanted = set(names)
        arch = assembly_arch(report.target, self.compile_arch)[0] if self.compile_arch else None
        if arch is None:
            results = {mode: self._transformed(report.ptx_sha256, module, mode) for mode in self.modes}
            self.finish.append(lambda: self._record(image, stem, report, module, wanted, None,
                                                    {m: (o, None, h) for m, (o, _, h) in results.items()}))
            return
        # ptxas runs in parallel (one process per module and mode); the report is filled in order
        futures = {mode: self.pool.submit(self._compiled, report.ptx_sha256, module, mode, arch)
                   for mode in self.modes}
        self.finish.append(lambda: self._record(image, stem, report, module, wanted, arch,
                                                {m: f.result() for m, f in futures.items()}))

    def _record(self, image: ImageReport, stem: str, report: SourceReport, module, wanted: set[str],
                arch: str | None, results: dict):
        slice_outcome = slice_cubin = None
        for mode in self.modes:
            outcome, cubin, hit = results[mode]
            for name in report.entries:
                if name not in wanted:
                    continue
                if name in outcome.refused:
                    image.kernels.append(KernelResult(report.origin, name, mode, "refused", hit,
                                                      outcome.refused[name]))
                else:
                    image.kernels.append(KernelResult(report.origin, name, mode, "ok", hit))
            if mode == "slice":
                slice_outcome, slice_cubin = outcome, cubin
        if arch is None or slice_outcome is None:
            return
        from tally.blocksched.plan import MAX_PARAMS

        for f in module.entries:
            if f.name not in wanted:
                continue
            k = PlanKernel(stem, report.origin, f.name, len(f.params), False)
            if f.name in slice_outcome.refused:
                k.reason = f"slice: {slice_outcome.refused[f.name]}"
            elif report.globals:
                shown = ", ".join(report.globals[:3]) + (", ..." if len(report.globals) > 3 else "")
                k.reason = (f"its module's code uses {len(report.globals)} module-scope .global/.const "
                            f"variable(s) ({shown}): a second copy of the module would not share their values")
            elif report.externs:
                k.reason = (f"its module declares external functions ({', '.join(report.externs[:3])}): "
                            "assembled as relocatable code, which the agent cannot load without linking")
            elif len(f.params) > MAX_PARAMS:
                k.reason = f"{len(f.params)} parameters (the agent takes at most {MAX_PARAMS})"
            else:
                k.included = True
                self.cubins[id(k)] = slice_cubin
            self.plan.append(k)

    def _transformed(self, sha: str, module, mode: str) -> tuple[_Outcome, str, bool]:
        """(every entry's outcome, the transformed module's text, cache_hit) of transforming
        the whole module in `mode`: one pass of tally.ptx, one cache entry."""
        request = Request(sha, MODULE_ENTRY, mode, "module-ptx", ptx_version())
        cached = self._get(request, module)
        if cached is not None:
            try:
                return cached[0], cached[1].decode("utf-8", "surrogateescape"), True
            except UnicodeDecodeError:
                pass  # verified bytes we cannot have written: recompute
        outcome, transformed = transform_all(module, mode)
        if outcome.cacheable:
            self.cache.put(request, "ok", _payload(outcome, transformed.encode("utf-8", "surrogateescape")))
        return outcome, transformed, False

    def _compiled(self, sha: str, module, mode: str, arch: str) -> tuple[_Outcome, bytes | None, bool]:
        """(every entry's outcome, the cubin of the transformed module, cache_hit) for `mode`:
        one ptxas run per module (more only when ptxas rejects an entry, which is then left out)."""
        from tally.ptx.ptxas import assemble

        request = Request(sha, MODULE_ENTRY, mode, f"module-cubin:{arch}:{self.release}", ptx_version())
        cached = self._get(request, module)
        if cached is not None:
            return cached[0], cached[1] or None, True
        outcome, transformed, _ = self._transformed(sha, module, mode)
        ok, refused = list(outcome.ok), dict(outcome.refused)
        cacheable = outcome.cacheable
        cubin = b""
        attempts = 0
        while ok:
            try:
                result = assemble(transformed, arch, self.ptxas, keep_cubin=True)
            except (OSError, subprocess.SubprocessError) as exc:  # not the module's fault: do not remember
                refused.update({name: f"ptxas did not run: {exc}" for name in ok})
                ok, cacheable = [], False
                break
            if result.ok:
                cubin = result.cubin
                break
            reason, culprit = ptxas_failure(result.errors, transformed, mode)
            attempts += 1
            if culprit not in ok or attempts > MAX_PTXAS_RETRIES or len(ok) == 1:
                refused.update({name: reason for name in ok})
                ok = []
                break
            refused[culprit] = reason
            ok.remove(culprit)
            try:
                from tally.ptx import transform

                transformed = transform.transform_module(module, mode, ok).text
            except Exception as exc:  # it transformed these before: a defect; refuse, do not remember
                refused.update({name: f"tally.ptx failed: {type(exc).__name__}: {exc}" for name in ok})
                ok, cacheable = [], False
        final = _Outcome(ok, refused, cacheable)
        if cacheable:
            self.cache.put(request, "ok", _payload(final, cubin))
        return final, cubin or None, False

    def _get(self, request: Request, module) -> tuple[_Outcome, bytes] | None:
        """A verified module entry whose outcome covers exactly the module's entries, or None."""
        hit = self.cache.get(request)
        if hit is None or hit.status != "ok":
            return None
        try:
            return _unpayload(hit.payload, [f.name for f in module.entries])
        except ValueError as exc:
            _files.warn_once(f"module-entry:{request.key}", f"kernel cache entry {self.cache.path(request)} is not "
                             f"trusted ({exc}); ignored")
            return None


def module_globals(module) -> list[str]:
    """Names of the module-scope `.global` and `.const` variables the module declares or defines
    (`.extern` ones included); `.shared` ones are not listed."""
    from tally.ptx.parse import strip_comments

    found = []
    for item in module.items:
        if item.kind == "other":
            name = _declared_variable(strip_comments(module.text[item.start:item.end]))
            if name:
                found.append(name)
    return found


def _declared_variable(text: str) -> str | None:
    """The name a module-scope `.global`/`.const` declaration declares, or None for other text."""
    tokens = text.split()
    while tokens and tokens[0] in (".visible", ".extern", ".weak", ".common"):
        tokens.pop(0)
    if not tokens or tokens[0] not in (".global", ".const"):
        return None
    head = text.split("=", 1)[0].rstrip().rstrip(";")
    head = re.sub(r"(\s*\[[^\]]*\])+\s*$", "", head)
    name = re.search(r"([A-Za-z_$%][\w$]*)\s*$", head)
    return name.group(1) if name else tokens[0]


def referenced_globals(module, names: list[str]) -> list[str]:
    """Those of `names` (module-scope variables) that anything else in the module mentions: a
    function body, or another variable's initializer. A variable nothing mentions cannot
    change what the module's kernels compute, whatever its copy holds (Triton's libdevice
    kernels carry such a one, `_$_str` = "__CUDA_FTZ", left over from __nvvm_reflect)."""
    from tally.ptx.parse import strip_comments

    if not names:
        return []
    found = set()
    for item in module.items:
        text = strip_comments(module.text[item.start:item.end])
        for name in names:
            if name in found or name not in text:
                continue
            uses = re.findall(rf"(?<![\w$%.]){re.escape(name)}(?![\w$])", text)
            # the variable's own declaration mentions it once
            declares = item.kind == "other" and _declared_variable(text) == name
            if len(uses) > (1 if declares else 0):
                found.add(name)
    return [n for n in names if n in found]


def transform_all(module, mode: str) -> tuple[_Outcome, str]:
    """Every entry of the module transformed in `mode` in one pass of tally.ptx: (outcome, text).

    An entry tally.ptx refuses is left out with its reason. If tally.ptx fails (a defect)
    on the whole batch, the entries are tried one by one so that the failing one is refused
    alone (and the outcome is not cached)."""
    from tally.ptx import transform

    names = [f.name for f in module.entries]
    if not names:
        return _Outcome([], {}), module.text
    try:
        result = transform.transform_module(module, mode, names)
        return _Outcome([r.entry for r in result.entries if not r.refusal],
                        {r.entry: r.refusal for r in result.entries if r.refusal}), result.text
    except Exception:
        pass
    ok, refused, cacheable = [], {}, True
    for name in names:
        try:
            result = transform.transform_module(module, mode, [name])
        except TallyError as exc:
            refused[name] = str(exc)
            continue
        except Exception as exc:
            refused[name] = f"tally.ptx failed: {type(exc).__name__}: {exc}"
            cacheable = False
            continue
        (entry,) = result.entries
        if entry.refusal:
            refused[name] = entry.refusal
        else:
            ok.append(name)
    text = module.text
    if ok:
        try:
            text = transform.transform_module(module, mode, ok).text
        except Exception as exc:
            refused.update({name: f"tally.ptx failed: {type(exc).__name__}: {exc}" for name in ok})
            ok, cacheable = [], False
    return _Outcome(ok, refused, cacheable), text


_PTXAS_LINE = re.compile(r"\bline (\d+)\b")
_HEADER = re.compile(r"^[ \t]*(?:\.(?:visible|weak|extern)[ \t]+)*\.(entry|func)\b[ \t]*(?:\([^)]*\)[ \t]*)?([\w$]*)",
                     re.M)


def ptxas_failure(errors: str, text: str, mode: str) -> tuple[str, str | None]:
    """(the refusal reason, the original entry whose transformed copy ptxas complains about, or None)."""
    from tally.ptx.abi import ENTRY_SUFFIX

    lines = [line for line in errors.splitlines() if line.strip()]
    first = next((line for line in lines if re.search(r"error|fatal", line, re.I)), lines[0] if lines else "no output")
    first = re.sub(r"\S*/module\.ptx", "module.ptx", first.strip())
    reason = f"ptxas rejected the transformed module: {first[:300]}"
    match = _PTXAS_LINE.search(first)
    if not match:
        return reason, None
    line = int(match.group(1))
    offset, seen = 0, 1
    while seen < line:
        offset = text.find("\n", offset)
        if offset < 0:
            return reason, None
        offset += 1
        seen += 1
    owner = None
    for header in _HEADER.finditer(text, 0, offset + 1):
        owner = header
    if owner is None or owner.group(1) != "entry" or not owner.group(2).endswith(ENTRY_SUFFIX[mode]):
        return reason, None
    return reason, owner.group(2)[: -len(ENTRY_SUFFIX[mode])]


def _payload(outcome: _Outcome, data: bytes) -> bytes:
    head = {"format": _PAYLOAD_FORMAT, "version": 1, "ok": sorted(outcome.ok),
            "refused": dict(sorted(outcome.refused.items()))}
    return _files.canonical_json(head) + b"\n" + data


def _unpayload(payload: bytes, entries: list[str]) -> tuple[_Outcome, bytes]:
    head, _, data = _files.json_head(payload, "outcome")
    if not isinstance(head, dict) or set(head) != {"format", "version", "ok", "refused"} \
            or head["format"] != _PAYLOAD_FORMAT or head["version"] != 1:
        raise ValueError("not a module outcome")
    ok, refused = head["ok"], head["refused"]
    if not isinstance(ok, list) or not all(isinstance(n, str) for n in ok) or not isinstance(refused, dict) \
            or not all(isinstance(r, str) and r for r in refused.values()):
        raise ValueError("outcome fields")
    if len(set(ok)) != len(ok) or set(ok) & set(refused) or set(ok) | set(refused) != set(entries):
        raise ValueError("its entries are not the module's")
    if ok and not data:
        raise ValueError("ok entries without code")
    return _Outcome(list(ok), dict(refused)), data
