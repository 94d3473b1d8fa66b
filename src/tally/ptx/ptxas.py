"""Locating ptxas and assembling PTX with it.

Search order: $TALLY_PTXAS, ptxas on PATH, $CUDA_HOME/bin (and $CUDA_PATH),
/usr/local/cuda*/bin (newest first), then the pip wheel `nvidia-cuda-nvcc`
(site-packages nvidia/cu13/bin or nvidia/cuda_nvcc/bin).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tally.errors import TallyError


def _candidates() -> list[Path]:
    found: list[Path] = []
    explicit = os.environ.get("TALLY_PTXAS")
    if explicit:
        found.append(Path(explicit))
    on_path = shutil.which("ptxas")
    if on_path:
        found.append(Path(on_path))
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root:
            found.append(Path(root) / "bin" / "ptxas")
    for directory in sorted(glob.glob("/usr/local/cuda*/bin"), reverse=True):
        found.append(Path(directory) / "ptxas")
    roots = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    roots.append(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    roots += [p for p in sys.path if p.endswith("site-packages")]
    for root in roots:
        if root:
            for sub in ("nvidia/cu13/bin", "nvidia/cuda_nvcc/bin"):
                found.append(Path(root) / sub / "ptxas")
    return found


def find_ptxas() -> Path:
    """The first usable ptxas, or a TallyError naming where it looked."""
    if os.environ.get("TALLY_PTXAS") and not os.access(os.environ["TALLY_PTXAS"], os.X_OK):
        raise TallyError(f"TALLY_PTXAS={os.environ['TALLY_PTXAS']} is not an executable file")
    for candidate in _candidates():
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise TallyError(
        "ptxas not found: set TALLY_PTXAS, put the CUDA toolkit's bin on PATH, set CUDA_HOME, "
        "or pip install nvidia-cuda-nvcc"
    )


def arch_for(ptx_text: str, default: str = "sm_90") -> str:
    """The -arch to assemble a module with: its .target when that is an
    arch-specific variant (sm_90a needs -arch=sm_90a), else `default`."""
    match = re.search(r"^\s*\.target\s+(sm_\d+[af]?)", ptx_text, re.M)
    if match and match.group(1)[-1] in "af":
        return match.group(1)
    return default


_ARCH = re.compile(r"sm_(\d{2,3})([af]?)")


def module_target(ptx_text: str) -> str | None:
    """The module's `.target` architecture (e.g. "sm_90a"), or None when it names none."""
    match = re.search(r"^\s*\.target\s+(sm_\d+[af]?)\b", ptx_text, re.M)
    return match.group(1) if match else None


def assembly_arch(target: str | None, requested: str) -> tuple[str | None, str | None]:
    """(the -arch to assemble a module whose `.target` is `target` for a GPU of `requested`, None),
    or (None, why it cannot run there).

    ptxas refuses arch-specific PTX (`.target sm_90a`) for the plain architecture
    (`-arch=sm_90`), and Triton writes sm_90a on Hopper; a cubin for sm_90a runs on an
    sm_90 GPU, so a module whose target is the arch-specific (a) or family (f) variant
    of the requested architecture is assembled for its own target. A module for a newer
    architecture than requested, or arch-specific code of another architecture, cannot
    run on the requested GPU: refused with the reason. Anything else (older plain
    targets, no target) is assembled for `requested`, and ptxas has the last word."""
    want = _ARCH.fullmatch(requested)
    have = _ARCH.fullmatch(target) if target else None
    if want is None:
        raise TallyError(f"{requested!r} is not a GPU architecture like sm_90")
    if have is None:
        return requested, None
    have_sm, want_sm = int(have.group(1)), int(want.group(1))
    if have_sm > want_sm:
        return None, f"PTX .target {target} is newer than {requested}"
    if have.group(2) == "a" and have_sm != want_sm:
        return None, f"PTX .target {target} is specific to sm_{have_sm} (it does not run on {requested})"
    if have.group(2) and have_sm == want_sm:
        return target, None
    return requested, None


@dataclass
class Resources:
    """What ptxas -v reports for one function."""

    registers: int = 0
    smem: int = 0  # static shared memory bytes (the dynamic array is not counted)
    stack: int = 0  # stack frame bytes
    spill_stores: int = 0
    spill_loads: int = 0


@dataclass
class AssemblyResult:
    ok: bool
    errors: str  # ptxas stderr (warnings included when ok; with verbose, also ptxas's info lines)
    command: list[str]
    resources: dict[str, Resources] = field(default_factory=dict)  # per function, with verbose=True
    cubin: bytes | None = None  # the assembled code, with keep_cubin=True and ok


_VERSION = re.compile(r"\bV(\d+\.\d+\.\d+)\b")
_versions: dict[str, str] = {}


def ptxas_version(ptxas: Path | None = None) -> str:
    """ptxas's release, e.g. "13.0.88" (from `ptxas --version`): compiled code is only as good as
    the assembler that made it, so cached cubins are keyed by it."""
    ptxas = ptxas or find_ptxas()
    key = str(ptxas)
    if key not in _versions:
        try:
            out = subprocess.run([key, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TallyError(f"cannot run {ptxas} --version: {exc}") from None
        match = _VERSION.search(out)
        if not match:
            raise TallyError(f"{ptxas} --version printed no release number")
        _versions[key] = match.group(1)
    return _versions[key]


_INFO_FUNCTION = re.compile(r"ptxas info\s*: (?:Compiling entry function|Function properties for|Compiling function) '?([\w$]+)'?")


def parse_resources(output: str) -> dict[str, Resources]:
    """Per-function resource usage from ptxas -v output."""
    resources: dict[str, Resources] = {}
    current = None
    for line in output.splitlines():
        found = _INFO_FUNCTION.search(line)
        if found:
            current = resources.setdefault(found.group(1), Resources())
            continue
        if current is None:
            continue
        for pattern, attribute in ((r"Used (\d+) registers", "registers"), (r"(\d+) bytes smem", "smem"),
                                   (r"(\d+) bytes stack frame", "stack"), (r"(\d+) bytes spill stores", "spill_stores"),
                                   (r"(\d+) bytes spill loads", "spill_loads")):
            match = re.search(pattern, line)
            if match:
                setattr(current, attribute, int(match.group(1)))
    return resources


def assemble(ptx_text: str, arch: str | None = None, ptxas: Path | None = None, timeout: float = 300,
             verbose: bool = False, keep_cubin: bool = False) -> AssemblyResult:
    """Assemble PTX text with ptxas into a throwaway cubin; report errors.

    Modules that declare external functions (dynamic parallelism's runtime
    calls) are assembled as relocatable code (-c), as nvcc -rdc would.
    `verbose` adds -v and fills `resources` (registers, static shared memory,
    stack and spills per function); `keep_cubin` returns the assembled code."""
    ptxas = ptxas or find_ptxas()
    arch = arch or arch_for(ptx_text)
    relocatable = ["-c"] if re.search(r"^\s*\.extern\s+\.func", ptx_text, re.M) else []
    with tempfile.TemporaryDirectory(prefix="tally-ptxas-") as tmp:
        source = Path(tmp) / "module.ptx"
        source.write_text(ptx_text)
        command = [str(ptxas), f"-arch={arch}", *relocatable, *(["-v"] if verbose else []),
                   "-o", str(Path(tmp) / "module.cubin"), str(source)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        cubin = None
        if keep_cubin and completed.returncode == 0:
            try:
                cubin = (Path(tmp) / "module.cubin").read_bytes()
            except OSError:
                cubin = None
    output = (completed.stdout + "\n" + completed.stderr).strip()
    ok = completed.returncode == 0 and (cubin is not None or not keep_cubin)
    return AssemblyResult(ok, completed.stderr.strip(), command, parse_resources(output) if verbose else {}, cubin)
