"""The 2-GPU demonstration's pure parts (benchmarks/multi_gpu_demo.py); the demo itself needs 2 GPUs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmark_scripts import load

demo = load("multi_gpu_demo")
SCRIPT = Path(demo.__file__)


def test_clients_are_keyed_by_pid_with_their_gpu():
    status = {"gpus": [{"index": 0, "uuid": "GPU-a", "clients": [{"pid": 10, "priority": "high"}]},
                       {"index": 1, "uuid": "GPU-b", "clients": [{"pid": 11, "priority": "best-effort"}, "junk"]}]}
    clients = demo.clients_by_pid(status)
    assert clients[10]["gpu_uuid"] == "GPU-a" and clients[11]["gpu_index"] == 1 and len(clients) == 2


def test_summary_calls_gpus_independent_only_when_the_other_gpu_run_was_never_held():
    runs = {"alone": {"steps_per_s": 10.0, "be": {"held_ms": 0.0}},
            "other-gpu": {"steps_per_s": 9.8, "be": {"held_ms": 0.0, "gpu_index": 1}},
            "same-gpu": {"steps_per_s": 4.0, "be": {"held_ms": 3000.0, "gpu_index": 0}}}
    summary = demo.summarize(runs)
    assert summary["independent"] and abs(summary["other-gpu"]["vs_alone"] - 0.98) < 1e-9
    runs["other-gpu"]["be"]["held_ms"] = 12.5  # held by an HP client of another GPU: not independent
    assert not demo.summarize(runs)["independent"]


def test_steps_parsed_from_the_be_output():
    assert demo.steps_per_s("noise\nSTEPS_PER_S 12.500\n") == 12.5 and demo.steps_per_s("") is None


def test_without_two_gpus_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          env={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "needs at least 2 GPUs" in proc.stderr
