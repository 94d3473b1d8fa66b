"""The pure parts of benchmarks/gpu_gate_lookahead.py (its measurements need a GPU)."""
from __future__ import annotations

import subprocess
import sys

from benchmark_scripts import load

probe = load("gpu_gate_lookahead")


def test_kernels_are_sorted_by_the_word_they_saw():
    seen = [probe.OPEN] * 5 + [probe.CLOSED] * 3 + [probe.REOPENED] * 2 + [0]
    assert probe.summarize(seen) == {"before_close": 5, "lookahead": 3, "after_reopen": 2, "never_ran": 1,
                                     "valid": True}
    # a close that came after the last kernel (or before the first) measured nothing
    assert not probe.summarize([probe.OPEN] * 4)["valid"]
    assert not probe.summarize([probe.CLOSED] * 2 + [probe.REOPENED] * 2)["valid"]


def test_the_table_has_the_median_lookahead_and_the_wait_cost():
    rounds = [{"before_close": 10, "lookahead": k, "after_reopen": 5, "never_ran": 0, "valid": True}
              for k in (1, 4, 2)]
    rounds.append({"before_close": 20, "lookahead": 99, "after_reopen": 0, "never_ran": 0, "valid": False})
    text = probe.markdown({"environment": {"date": "d", "gpu": "g"},
                           "rows": [{"kernel_us": 20, "kernels": 17, "rounds": rounds,
                                     "us_per_kernel_plain": 21.0, "us_per_kernel_waits": 22.5,
                                     "watchdog_fired": 1}]})
    line = next(l for l in text.splitlines() if l.startswith("| 20 |"))
    cells = line.split(" | ")
    assert cells[1:4] == ["1, 4, 2", "2", "10/5, 10/5, 10/5, 20/0"]  # the invalid round: no median
    assert cells[-2:] == ["+1.50", "1 |"]  # the wait cost, and how often the watchdog had to open a hold


def test_a_sample_the_watchdog_spoiled_is_left_out():
    nan = float("nan")
    assert probe.median_of_samples([10.0, nan, 12.0]) == 11.0
    assert probe.median_of_samples([nan, nan]) != probe.median_of_samples([nan, nan])  # NaN: nothing measured


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, probe.__file__, "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode == 0:  # a machine with a GPU and CuPy: it measured
        assert (tmp_path / "gpu_gate_lookahead.json").exists()
        return
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_gate_lookahead: needs a CUDA GPU and CuPy"), r.stderr
