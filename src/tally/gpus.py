"""Which NVIDIA GPUs this node has, by UUID (the key of every scoreboard).

NVML (the optional `nvidia-ml-py` package, imported as `pynvml`) is asked
first; without it, `nvidia-smi` is parsed. No GPU, no driver, or no tool gives
an empty list, never an exception, so callers can say so in one line.
CUDA_VISIBLE_DEVICES narrows the list the way CUDA would (indices or UUID
prefixes, up to the first entry that matches nothing).

Tests inject GPUs with TALLY_FAKE_GPUS="GPU-aaaa,GPU-bbbb" (UUIDs, comma-separated).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

NO_GPU_MESSAGE = "no NVIDIA GPU found (nvidia-smi/NVML not available)"


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML/nvidia-smi index (PCI order), not CUDA's enumeration order
    uuid: str
    name: str
    driver_version: str
    cuda_driver_version: str | None  # e.g. "13.0"; None when unknown

    def to_dict(self) -> dict:
        return asdict(self)


def list_gpus(honour_visible_devices: bool = True) -> list[GpuInfo]:
    fake = os.environ.get("TALLY_FAKE_GPUS")
    if fake is not None:
        gpus = _fake_gpus(fake)
    else:
        gpus = _nvml_gpus()
        if gpus is None:
            gpus = _nvidia_smi_gpus()
    if honour_visible_devices:
        gpus = filter_visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return gpus


def _fake_gpus(spec: str) -> list[GpuInfo]:
    uuids = [u.strip() for u in spec.split(",") if u.strip()]
    return [GpuInfo(i, u, "fake GPU (TALLY_FAKE_GPUS)", "fake", None) for i, u in enumerate(uuids)]


def _nvml_gpus() -> list[GpuInfo] | None:
    """None when NVML cannot be asked (package absent); [] when it answers
    that there is no GPU or no driver."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 13000
            cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception:
            cuda_version = None
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(GpuInfo(index, _text(pynvml.nvmlDeviceGetUUID(handle)),
                                _text(pynvml.nvmlDeviceGetName(handle)), driver, cuda_version))
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvidia_smi_gpus() -> list[GpuInfo]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "--query-gpu=index,uuid,name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    cuda_version = _nvidia_smi_cuda_version(smi)
    return parse_nvidia_smi_csv(listing.stdout, cuda_version)


def parse_nvidia_smi_csv(text: str, cuda_version: str | None = None) -> list[GpuInfo]:
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        # a GPU name may itself hold a comma: the name is everything between uuid and driver
        gpus.append(GpuInfo(int(parts[0]), parts[1], ", ".join(parts[2:-1]), parts[-1], cuda_version))
    return gpus


def _nvidia_smi_cuda_version(smi: str) -> str | None:
    try:
        banner = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*([0-9.]+)", banner)
    return match.group(1) if match else None


def filter_visible(gpus: list[GpuInfo], visible: str | None) -> list[GpuInfo]:
    """Applies CUDA_VISIBLE_DEVICES as CUDA reads it: unset = all; each entry
    an index or a (prefix of a) UUID; the list ends at the first entry that
    names no GPU; a GPU named twice makes CUDA see none."""
    if visible is None:
        return list(gpus)
    chosen: list[GpuInfo] = []
    for entry in (e.strip() for e in visible.split(",")):
        match = _match(gpus, entry)
        if match is None:
            break
        if match in chosen:
            return []
        chosen.append(match)
    return chosen


def _match(gpus: list[GpuInfo], entry: str) -> GpuInfo | None:
    if not entry:
        return None
    if entry.isdigit():
        return next((g for g in gpus if g.index == int(entry)), None)
    wanted = entry if entry.startswith("GPU-") else f"GPU-{entry}"
    matches = [g for g in gpus if g.uuid.startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def select(gpus: list[GpuInfo], spec: str | None) -> list[GpuInfo]:
    """The GPUs named by a `--gpus` value (indices or UUID prefixes, comma-
    separated; None or "all" = every GPU). Raises ValueError naming the first
    entry that matches nothing."""
    if spec is None or spec.strip().lower() == "all":
        return list(gpus)
    chosen: list[GpuInfo] = []
    for entry in (e.strip() for e in spec.split(",")):
        match = _match(gpus, entry)
        if match is None:
            known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus)
            raise ValueError(f"--gpus: no GPU {entry!r}; this node has {known}")
        if match not in chosen:
            chosen.append(match)
    return chosen
