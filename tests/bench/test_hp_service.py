"""benchmarks/hp_service.py on run files written here (its inputs come from GPU runs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load

hp_service = load("hp_service")
SCRIPT = Path(hp_service.__file__)


def _run(system: str, latencies: list[float], service: list[float], load_: float = 0.5) -> dict:
    return {"key": {"hp": "h", "be": "b", "system": system, "load": load_},
            "hp": {"latencies_ms": latencies, "service_ms": service}}


def _write(directory: Path, *runs) -> Path:
    (directory / "runs").mkdir(parents=True)
    for i, run in enumerate(runs):
        (directory / "runs" / f"{i}.json").write_text(json.dumps(run))
    return directory


def test_queued_requests_are_those_that_waited_and_each_run_meets_its_own_standalone(tmp_path):
    d = _write(tmp_path / "call", _run("standalone", [1.0], [1.0], load_=0.3), _run("standalone", [2.0, 3.0], [2.0, 2.0]),
               _run("tally", [2.1, 2.2, 4.0, 1.92], [2.1, 2.2, 2.2, 1.9]))
    tally = next(r for r in hp_service.rows_of(d) if r["system"] == "tally")
    assert tally["queued"] == 1 and tally["queued_service_mean_ms"] == 2.2  # only 4.0 - 2.2 >= 0.05 waited
    assert abs(tally["service_mean_ms"] - 2.1) < 1e-9
    # against the standalone run at its own load (2.0 ms), not the one at 0.3 (1.0 ms)
    assert abs(tally["service_vs_standalone"] - 0.05) < 1e-9
    assert "| call | h | 0.5 | b | tally | 2.100 | +5.0% |" in hp_service.markdown([tally])


def test_runs_without_latencies_are_left_out_and_no_standalone_gives_no_ratio(tmp_path):
    d = _write(tmp_path / "call", {"key": {"system": "mps"}, "hp": None}, _run("tally", [2.0], [2.0]))
    rows = hp_service.rows_of(d)
    assert [r["system"] for r in rows] == ["tally"] and rows[0]["service_vs_standalone"] is None
    assert rows[0]["queued_service_mean_ms"] is None
    assert "| call | h | 0.5 | b | tally | 2.000 | - | 2.000 | - |" in hp_service.markdown(rows)


@pytest.mark.parametrize("content", ["[]", '{"key": {}, "hp": {"latencies_ms": [1, null], "service_ms": [1, 1]}}',
                                     '{"key": {}, "hp": []}', '{"hp": {}}', "{not json"])
def test_a_run_file_out_of_place_is_a_one_line_error(tmp_path, content):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text(content)
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"hp_service: {tmp_path / 'runs' / 'r.json'}: ")


def test_a_directory_without_runs_or_without_latencies_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"hp_service: {tmp_path} has no runs/ directory"
    _write(tmp_path / "old", {"key": {"system": "tally"}, "hp": {"latency": {}}})
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "old")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "hp_service: no run in these directories has per-request latencies"
