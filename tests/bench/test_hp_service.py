"""benchmarks/hp_service.py on run files written here (its inputs come from GPU runs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmark_scripts import load

hp_service = load("hp_service")
SCRIPT = Path(hp_service.__file__)


def _run(system: str, latencies: list[float], service: list[float]) -> dict:
    return {"key": {"hp": "h", "be": "b", "system": system, "load": 0.5},
            "hp": {"latencies_ms": latencies, "service_ms": service}}


def _write(directory: Path, *runs: dict) -> Path:
    (directory / "runs").mkdir(parents=True)
    for i, run in enumerate(runs):
        (directory / "runs" / f"{i}.json").write_text(json.dumps(run))
    return directory


def test_queued_requests_are_those_that_waited_and_the_reference_is_standalone(tmp_path):
    d = _write(tmp_path / "call", _run("standalone", [2.0, 3.0], [2.0, 2.0]),
               _run("tally", [2.1, 2.2, 4.0, 1.92], [2.1, 2.2, 2.2, 1.9]))
    rows = {r["system"]: r for r in hp_service.rows_of(d)}
    tally = rows["tally"]
    assert tally["queued"] == 1 and tally["queued_service_mean_ms"] == 2.2  # only 4.0 - 2.2 >= 0.05 waited
    assert abs(tally["service_mean_ms"] - 2.1) < 1e-9
    assert abs(tally["service_vs_standalone"] - 0.05) < 1e-9
    assert rows["standalone"]["service_vs_standalone"] == 0.0
    assert "| call | b | tally | 2.100 | +5.0% |" in hp_service.markdown(list(rows.values()))


def test_runs_without_latencies_are_left_out_and_no_standalone_gives_no_ratio(tmp_path):
    d = _write(tmp_path / "call", {"key": {"system": "mps"}, "hp": {}}, _run("tally", [2.0], [2.0]))
    rows = hp_service.rows_of(d)
    assert [r["system"] for r in rows] == ["tally"] and rows[0]["service_vs_standalone"] is None
    assert rows[0]["queued_service_mean_ms"] is None
    assert "| call | b | tally | 2.000 | - | 2.000 | - |" in hp_service.markdown(rows)


def test_a_directory_without_runs_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"hp_service: {tmp_path} has no runs/ directory"
