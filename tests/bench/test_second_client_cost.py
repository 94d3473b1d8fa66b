"""The pure parts of benchmarks/second_client_cost.py, and its HP loop on a fake workload (the
measurement itself needs a GPU and MPS)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmark_scripts import load

cost = load("second_client_cost")
SCRIPT = Path(cost.__file__)


def _w(start, end, mean, p10=1.0):
    return {"start": start, "end": end, "n": 10, "mean_ms": mean, "p10_ms": p10}


def test_a_phase_takes_the_windows_wholly_inside_it():
    windows = [_w(0.0, 1.0, 2.0), _w(1.0, 2.0, 4.0), _w(2.0, 3.0, 6.0), _w(2.5, 3.5, 100.0)]
    phases = [{"variant": "alone", "start": 0.0, "end": 2.0}, {"variant": "mps", "start": 1.5, "end": 3.2}]
    cost.assign(windows, phases)
    assert phases[0]["windows"] == 2 and phases[0]["mean_ms"] == 3.0
    assert phases[1]["windows"] == 1 and phases[1]["mean_ms"] == 6.0  # (1.0, 2.0) began before it; (2.5, 3.5) ends after
    empty = [{"variant": "mps", "start": 10.0, "end": 11.0}]
    cost.assign(windows, empty)
    assert empty[0]["windows"] == 0 and empty[0]["mean_ms"] is None


def test_each_variant_phase_is_compared_with_the_alone_phases_next_to_it():
    phases = [{"variant": "alone", "mean_ms": 2.0}, {"variant": "mps", "mean_ms": 2.1},
              {"variant": "alone", "mean_ms": 2.2}, {"variant": "mps-16g", "mean_ms": 2.2},
              {"variant": "alone", "mean_ms": None}, {"variant": "mps", "mean_ms": 3.0}]
    rows = {r["variant"]: r for r in cost.summarize(phases)}
    assert abs(rows["mps"]["ratios"][0] - 0.0) < 1e-9  # 2.1 against (2.0 + 2.2) / 2
    assert len(rows["mps"]["ratios"]) == 1  # the last mps phase has no measured alone phase next to it
    assert abs(rows["mps-16g"]["ratios"][0] - 0.0) < 1e-9  # against 2.2 alone: the None one is skipped
    # alone phases against their alone neighbours: 2.0 against 2.2, 2.2 against 2.0
    assert rows["alone"]["means_ms"] == [2.0, 2.2]
    assert [round(x, 4) for x in rows["alone"]["ratios"]] == [round(2.0 / 2.2 - 1, 4), 0.1]
    text = cost.markdown({"environment": {"date": "d", "gpu": "g", "driver": "v"}, "hp": "h", "rounds": 1,
                          "phase_s": 4.0, "summary": cost.summarize(phases)})
    assert "| mps-16g | 1 | +0.00% | +0.00% to +0.00% | 2.200 |" in text


def test_the_hp_loop_reports_windows_until_its_stdin_closes():
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--hp-loop", "fake-infer", "--window-s", "0.05"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    first = json.loads(proc.stdout.readline())
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert first["n"] >= 1 and 4.0 < first["mean_ms"] < 50.0  # fake-infer sleeps 5 ms a request
    assert first["end"] - first["start"] >= 0.05


def test_an_unknown_variant_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--variants", "mps,nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown variant(s): nope" in r.stderr


def test_a_child_that_exits_before_it_is_ready_fails_at_once_with_its_last_line():
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('Traceback', file=sys.stderr); "
                             "print('boom: no GPU', file=sys.stderr); sys.exit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        cost.wait_ready(proc, threading.Event(), 60, "idle client mps")
    except RuntimeError as exc:
        assert str(exc) == "idle client mps exited (3) before it was ready: boom: no GPU"
    else:
        raise AssertionError("no error")
    assert time.monotonic() - t0 < 10  # not the 60-s timeout


def test_each_round_starts_the_variants_one_further_on():
    assert [cost.round_order(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
