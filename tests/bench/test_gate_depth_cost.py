"""The pure parts of benchmarks/gate_depth_cost.py (its measurements need a GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmark_scripts import load

depth = load("gate_depth_cost")
SCRIPT = Path(depth.__file__)


def test_variants_apply_to_the_configurations_with_an_hp_client_only():
    names = {c["name"]: c for c in depth.configs([100], kernel_times=True, batched=True, run_ahead=True)}
    assert set(names) == {"mps", "tally-no-hp", "idle-hp", "budget-100", "idle-hp-gpu-gate",
                          "idle-hp-kernel-times", "budget-100-kernel-times", "idle-hp-batched", "budget-100-batched",
                          "idle-hp-run-ahead", "budget-100-run-ahead"}
    # the budget configurations are the launch-level gate's (tally run's default is the GPU-side gate)
    launch_level = {"TALLY_GPU_GATE": "0"}
    assert names["idle-hp"]["env"] == names["budget-100"]["env"] == launch_level
    assert names["budget-100-run-ahead"]["env"] == {**launch_level, "TALLY_RUN_AHEAD": "1"}
    assert names["budget-100-kernel-times"]["env"] == {**launch_level, "TALLY_KERNEL_TIMES": "1"}
    assert names["budget-100-batched"]["env"] == {**launch_level, "TALLY_BATCH_WRITES": "1"}
    assert names["idle-hp-gpu-gate"]["env"] == {"TALLY_GPU_GATE": "1"} and names["idle-hp-gpu-gate"]["hp"]
    assert names["budget-100"]["up"] == ["--budget-us", "100", "--unthrottle-ms", "10000000"]
    assert "env" not in names["tally-no-hp"] and not names["tally-no-hp"]["hp"]


def test_the_table_gives_medians_over_rounds_against_the_mps_median():
    rows = [{"workload": "w", "config": "mps", "steps_per_s": s, "round": i} for i, s in enumerate([10.0, 12.0, 11.0])]
    rows += [{"workload": "w", "config": "budget-100", "steps_per_s": s, "round": i, "long_kernels": 7 + i}
             for i, s in enumerate([8.0, 5.5, 9.0])]
    text = depth.markdown({"environment": {"date": "d", "gpu": "g", "python_torch": "p"}, "seconds": 5,
                           "rounds": 3, "rows": rows})
    mps_line = next(line for line in text.splitlines() if line.startswith("| w | mps |"))
    line = next(line for line in text.splitlines() if line.startswith("| w | budget-100 |"))
    assert mps_line.split(" | ")[2:4] == ["11.00", "1.000"]
    cells = line.split(" | ")
    assert cells[2:4] == ["8.00", f"{8.0 / 11.0:.3f}"]
    assert cells[5] == "8.00, 5.50, 9.00"
    assert cells[9] == "9"  # the last round's counter


def test_an_unknown_configuration_is_a_usage_error():
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", "/nonexistent-never-made", "--configs", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown configuration(s): nope" in r.stderr


def test_paired_ratios_compare_each_round_with_that_rounds_mps_run():
    rows = [{"workload": "w", "config": "mps", "steps_per_s": s, "round": i} for i, s in enumerate([10.0, 20.0])]
    rows += [{"workload": "w", "config": "tally-no-hp", "steps_per_s": s, "round": i}
             for i, s in enumerate([9.0, 21.0, 30.0])]  # round 2 has no mps run: no pair
    assert depth.paired_ratios(rows)[("w", "tally-no-hp")] == [0.9, 1.05]
    text = depth.markdown({"environment": {"date": "d", "gpu": "g", "python_torch": "p"}, "seconds": 5,
                           "rounds": 3, "rows": rows, "cudnn_benchmark": False})
    line = next(line for line in text.splitlines() if line.startswith("| w | tally-no-hp |"))
    assert line.split(" | ")[4] == "0.975 [0.900-1.050]"
    assert "cuDNN benchmark mode off" in text


def test_rounds_alternate_the_order_of_the_configurations():
    assert [depth.round_order(["mps", "tally-no-hp", "idle-hp"], r) for r in range(3)] == [
        ["mps", "tally-no-hp", "idle-hp"], ["idle-hp", "tally-no-hp", "mps"], ["mps", "tally-no-hp", "idle-hp"]]
