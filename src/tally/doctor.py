"""`tally doctor`: what tally needs on this machine, what is there, and how to
fix what is not."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

import click

from tally import cudalibs
from tally.errors import TallyError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def check_agent() -> Check:
    try:
        path = cudalibs.agent_path()
    except TallyError as exc:
        return Check("tally agent", False, str(exc), "pip install . (builds agent/tally_agent.c)")
    with open(path, "rb") as f:
        has_entry = b"InitializeInjection" in f.read()
    if not has_entry:
        return Check("tally agent", False, f"{path} does not export InitializeInjection", "rebuild: pip install .")
    return Check("tally agent", True, str(path))


def check_driver() -> Check:
    version = cudalibs.driver_version()
    if version is None:
        return Check(
            "CUDA driver",
            False,
            "libcuda.so.1 not loadable",
            "install the NVIDIA driver (it provides libcuda.so.1); in a container run with the NVIDIA runtime",
        )
    return Check("CUDA driver", True, f"libcuda supports CUDA {cudalibs.format_cuda_version(version)}")


def check_gpus() -> Check:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return Check("GPUs", False, "nvidia-smi not found", "install the NVIDIA driver utilities (nvidia-smi)")
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,uuid,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("GPUs", False, f"nvidia-smi failed: {exc}", "check the driver installation (nvidia-smi)")
    rows = [r.strip() for r in out.stdout.splitlines() if r.strip()]
    if out.returncode != 0 or not rows:
        msg = (out.stderr or out.stdout).strip().splitlines()
        return Check("GPUs", False, msg[0] if msg else "no GPU listed", "check that an NVIDIA GPU is visible")
    return Check("GPUs", True, "; ".join(rows))


def check_cupti() -> Check:
    candidates = cudalibs.cupti_candidates()
    if not candidates:
        return Check(
            "libcupti",
            False,
            "not found in the Python wheels (nvidia/*/lib), the CUDA toolkit, or LD_LIBRARY_PATH",
            "pip install nvidia-cuda-cupti (or the CUDA toolkit), or set TALLY_CUPTI_PATH=/path/to/libcupti.so",
        )
    best = candidates[0]
    more = f" (+{len(candidates) - 1} more)" if len(candidates) > 1 else ""
    return Check("libcupti", True, f"{best.path} [{best.origin}]{more}")


def check_mps() -> Check:
    try:
        from tally.mps import find_binaries
    except ImportError:
        return Check("MPS", False, "tally.mps is missing from this build", "reinstall tally", required=False)
    try:
        found = find_binaries()
    except TallyError as exc:
        return Check("MPS", False, str(exc),
                     "install the NVIDIA driver's MPS binaries (nvidia-cuda-mps-control, nvidia-cuda-mps-server)")
    return Check("MPS", True, f"{found.control}, {found.server}")


def check_ptxas() -> Check:
    try:
        from tally.ptx.ptxas import find_ptxas
    except ImportError:
        return Check("ptxas", False, "tally.ptx is missing from this build", "reinstall tally", required=False)
    try:
        path = find_ptxas()
    except TallyError as exc:
        return Check("ptxas", False, str(exc), "pip install nvidia-cuda-nvcc (or set TALLY_PTXAS)", required=False)
    return Check("ptxas", True, str(path), required=False)


def check_injection_conflict() -> Check:
    existing = os.environ.get("CUDA_INJECTION64_PATH")
    if existing:
        return Check(
            "CUDA_INJECTION64_PATH",
            False,
            f"already set to {existing} (a profiler?); tally chains it, but only one CUPTI subscriber can be active",
            "unset it unless you are profiling",
            required=False,
        )
    return Check("CUDA_INJECTION64_PATH", True, "not set by anything else", required=False)


CHECKS = (check_agent, check_driver, check_gpus, check_cupti, check_mps, check_ptxas, check_injection_conflict)


def run_checks() -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:  # a broken check is reported, never a traceback
            name = check.__name__.removeprefix("check_")
            results.append(Check(name, False, f"the check itself failed: {exc!r}", "report this as a tally bug"))
    return results


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(as_json):
    """Check the driver, CUDA, CUPTI and MPS; say exactly what is missing and how to fix it.

    Exit status 0 when everything tally needs is there, 1 otherwise.
    """
    checks = run_checks()
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="tally doctor", show_lines=False)
        table.add_column("check")
        table.add_column("status")
        table.add_column("found / fix", overflow="fold")
        for c in checks:
            status = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]warn[/]")
            text = c.detail if c.ok else f"{c.detail}\n[bold]fix:[/] {c.fix}"
            table.add_row(c.name, status, text)
        Console().print(table)
    return 0 if all(c.ok for c in checks if c.required) else 1
