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
from dataclasses import dataclass
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


def ptxas_version(ptxas: Path | None = None) -> str:
    ptxas = ptxas or find_ptxas()
    output = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else "unknown"


def arch_for(ptx_text: str, default: str = "sm_90") -> str:
    """The -arch to assemble a module with: its .target when that is an
    arch-specific variant (sm_90a needs -arch=sm_90a), else `default`."""
    match = re.search(r"^\s*\.target\s+(sm_\d+[af]?)", ptx_text, re.M)
    if match and match.group(1)[-1] in "af":
        return match.group(1)
    return default


@dataclass
class AssemblyResult:
    ok: bool
    errors: str  # ptxas stderr (warnings included when ok)
    command: list[str]


def assemble(ptx_text: str, arch: str | None = None, ptxas: Path | None = None, timeout: float = 300) -> AssemblyResult:
    """Assemble PTX text with ptxas into a throwaway cubin; report errors.

    Modules that declare external functions (dynamic parallelism's runtime
    calls) are assembled as relocatable code (-c), as nvcc -rdc would."""
    ptxas = ptxas or find_ptxas()
    arch = arch or arch_for(ptx_text)
    relocatable = ["-c"] if re.search(r"^\s*\.extern\s+\.func", ptx_text, re.M) else []
    with tempfile.TemporaryDirectory(prefix="tally-ptxas-") as tmp:
        source = Path(tmp) / "module.ptx"
        source.write_text(ptx_text)
        command = [str(ptxas), f"-arch={arch}", *relocatable, "-o", str(Path(tmp) / "module.cubin"), str(source)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    return AssemblyResult(completed.returncode == 0, completed.stderr.strip(), command)
