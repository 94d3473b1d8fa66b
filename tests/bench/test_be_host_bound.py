"""The pure parts of benchmarks/be_host_bound.py (its measurement needs PyTorch and a GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmark_scripts import load

host = load("be_host_bound")
SCRIPT = Path(host.__file__)


def test_the_margin_is_what_the_host_could_add_before_the_step_grew():
    row = {"enqueue_ms": [10.0, 12.0, 19.5], "step_ms": [20.0, 21.0, 20.0], "launches": [970, 975, 980]}
    s = host.summary(row)
    assert s["enqueue_ms"] == 12.0 and s["step_ms"] == 20.0 and s["margin_ms"] == 8.0
    assert abs(s["host_bound_steps"] - 1 / 3) < 1e-9  # 19.5 of 20 ms enqueueing: above 90%
    assert s["launches_per_step"] == 975
    assert "launches_per_step" not in host.summary({"enqueue_ms": [1.0], "step_ms": [2.0], "launches": []})
    text = host.markdown({"environment": {"date": "d", "gpu": "g", "driver": "v"}, "steps": 3, "warmup": 1,
                          "rows": [{"workload": "w", "client": "mps", "summary": s}]})
    assert "| w | mps | 12.00 | 20.00 | 8.00 | 33% | 975 |" in text


def test_out_is_required():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--out is required" in r.stderr
