"""Finding the CUDA pieces tally loads at run time: libcuda, libcupti, the agent.

Nothing here needs a GPU: on a machine without a driver every lookup returns
None or an empty list, and the callers (doctor, run, trace) say what is missing.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import site
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tally.errors import TallyError

AGENT_FILENAME = "libtally_agent.so"


def agent_path() -> Path:
    """The built agent inside the installed package (TALLY_AGENT_PATH overrides)."""
    override = os.environ.get("TALLY_AGENT_PATH")
    path = Path(override) if override else Path(str(resources.files("tally") / AGENT_FILENAME))
    if not path.is_file():
        raise TallyError(
            f"the tally agent is missing ({path}): reinstall tally with `pip install .` so the agent is built"
        )
    return path


def driver_version() -> int | None:
    """CUDA driver API version (e.g. 13000), or None without a usable libcuda."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def format_cuda_version(version: int | None) -> str:
    if not version:
        return "none"
    return f"{version // 1000}.{(version % 1000) // 10}"


def cuda_toolkit_dirs() -> list[Path]:
    """Toolkit roots: CUDA_HOME/CUDA_PATH first, then /usr/local/cuda and versioned installs."""
    roots: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]))
    roots.append(Path("/usr/local/cuda"))
    roots.extend(Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    seen, unique = set(), []
    for root in roots:
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            unique.append(root)
    return unique


def python_site_dirs(python: str | None = None) -> list[Path]:
    """site-packages of this interpreter and, if the command is another Python
    (a different venv), of that one too, found from its location."""
    dirs = [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    if python:
        exe = shutil.which(python)
        if exe and Path(exe).name.startswith("python"):
            prefix = Path(exe).parent.parent
            dirs += [Path(p) for p in glob.glob(str(prefix / "lib" / "python3*" / "site-packages"))]
    seen, unique = set(), []
    for d in dirs:
        if d.is_dir() and d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


@dataclass(frozen=True)
class Candidate:
    path: Path
    origin: str  # "TALLY_CUPTI_PATH", "wheel", "toolkit", "LD_LIBRARY_PATH"

    @property
    def major(self) -> int | None:
        match = re.search(r"libcupti\.so\.(\d+)", self.path.name)
        return int(match.group(1)) if match else None


def cupti_candidates(python: str | None = None) -> list[Candidate]:
    """Every libcupti we could load, best first.

    Wheel copies next to the program's Python come first: PyTorch's profiler
    loads that same file, and two different libcupti builds in one process
    would conflict. Among the rest, versions newer than the driver are dropped
    (CUPTI needs a driver at least as new as itself).
    """
    explicit = os.environ.get("TALLY_CUPTI_PATH")
    if explicit:
        return [Candidate(Path(explicit), "TALLY_CUPTI_PATH")]
    found: list[Candidate] = []
    for sp in python_site_dirs(python):
        for pattern in ("nvidia/*/lib/libcupti.so*", "nvidia/cuda_cupti/lib/libcupti.so*"):
            found += [Candidate(Path(p), "wheel") for p in sorted(glob.glob(str(sp / pattern)), reverse=True)]
    for root in cuda_toolkit_dirs():
        for sub in ("extras/CUPTI/lib64", "targets/x86_64-linux/lib", "lib64", "lib"):
            found += [Candidate(Path(p), "toolkit") for p in sorted(glob.glob(str(root / sub / "libcupti.so*")))]
    for d in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        found += [Candidate(Path(p), "LD_LIBRARY_PATH") for p in sorted(glob.glob(os.path.join(d, "libcupti.so*")))]

    driver = driver_version()
    driver_major = driver // 1000 if driver else None
    seen, usable = set(), []
    for cand in found:
        real = cand.path.resolve()
        if real in seen or not real.is_file():
            continue
        if driver_major and cand.major and cand.major > driver_major:
            continue
        seen.add(real)
        usable.append(cand)
    return usable
