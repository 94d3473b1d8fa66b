"""The CPU-side parts of benchmarks/ptx_gpu_check.py (the GPU parts run on the H100)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings, strategies as st

from conftest import MANIFEST

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ptx_gpu_check.py"
spec = importlib.util.spec_from_file_location("ptx_gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_dry_run_prepares_every_module_and_plans_the_launchable_kernels(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--seed", "1"]) == 0
    plan = json.loads((tmp_path / "ptx_gpu_check_plan.json").read_text())
    launchable = [k for k in MANIFEST["kernels"] if k["grid"] is not None]
    assert len(plan["to_check"]) == len(launchable)
    workdir = Path(plan["workdir"])
    assert len(list(workdir.glob("*.ptx"))) == 3 * len({k["module"] for k in MANIFEST["kernels"]})
    for kernel in launchable:
        # every launch description matches the PTX parameter count
        from tally.ptx.parse import read_module
        module = read_module(Path(gpu_check.CORPUS) / kernel["module"])
        assert len(module.entry(kernel["entry"]).params) == len(kernel["params"]), kernel["entry"]
        for param in kernel["params"]:
            assert param["kind"] in ("input", "inout", "output", "zeros", "scalar", "null")
            if "dtype" in param:
                assert param["dtype"] in gpu_check.NUMPY_DTYPES or param["dtype"] in gpu_check.SCALAR_DTYPES


@settings(deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2**32 - 1))
def test_random_slice_sizes_cover_the_grid(total, seed):
    sizes = gpu_check.random_slice_sizes(np.random.default_rng(seed), total)
    assert all(size >= 1 for size in sizes)
    assert sum(sizes) >= total and sum(sizes[:-1]) < total


def test_report_tables():
    records = [{"kernel": "m:k", "modes": ["slice", "preemptible"],
                "checks": [{"check": "a", "identical": True}, {"check": "b", "identical": False}],
                "failures": ["b differs"],
                "throughput": {"original_ms": 1.0, "slice:4": {"ms": 2.0, "ratio": 0.5}},
                "preemption_latency": [{"workers": 132, "p50_ms": 0.02, "p99_ms": 0.05, "samples": 9},
                                       {"workers": 264, "p50_ms": 0.03, "p99_ms": 0.04, "samples": 9}]}]
    rows = gpu_check.summarize(records)
    assert rows[0]["identical"] == "1/2"
    assert rows[0]["preempt_p99_ms"] == 0.04 and rows[0]["preempt_workers"] == 264
    text = gpu_check.markdown({"gpu": "H100"}, rows, {"kernels": 1, "checks": 2, "identical": 1, "failures": 1})
    assert "| m:k | slice,preemptible | 1/2 | 1.0000 | slice:4=0.5 | 0.0300 | 0.0400 (264) | 1 |" in text
