"""Report generation: markdown table with every system, PNG charts, environment block."""
from __future__ import annotations

import json
import math

import pytest

from tally.bench import report
from tally.errors import TallyError


def _run(system, p99, overhead, be_norm, status="ok", reason=None, load=0.5):
    key = {"hp": "bert-infer", "be": "gpt2-train", "system": system, "load": load}
    if status != "ok":
        return {"key": key, "status": status, "reason": reason}
    latency = {"count": 3, "p50_ms": p99 / 2, "p90_ms": p99 * 0.9, "p99_ms": p99, "max_ms": p99 * 1.1,
               "mean_ms": p99 / 2}
    return {
        "key": key, "status": "ok",
        "hp": {"latency": latency, "service": latency, "latencies_ms": [p99 / 3, p99 / 2, p99], "incomplete": 0},
        "p99_overhead": overhead, "hp_normalized": 1.0, "be_normalized": be_norm,
        "system_throughput": math.nan if system == "standalone" else 1.0 + be_norm, "gpu_util_percent": 80.0,
        "workloads": {"hp": {"ref": "bert-infer", "kind": "infer", "batch_size": 32, "precision": "bf16",
                             "variant": "eager", "details": {"seq": 128}},
                      "be": {"ref": "gpt2-train", "kind": "train", "batch_size": 8, "precision": "amp-bf16",
                             "variant": "eager", "details": {}}},
        "info": {"hp": {"torch": "2.11.0", "cuda": "13.0", "device": "NVIDIA H100 80GB HBM3"}},
    }


def _write_runs(out_dir, entries):
    """An output dir as the runner leaves it: one runs/<run>.json per entry."""
    runs = out_dir / "runs"
    runs.mkdir(parents=True)
    for entry in entries:
        key = entry["key"]
        (runs / f"{key['hp']}__{key['be']}__{key['system']}__load{key['load']:g}.json").write_text(json.dumps(entry))
    return out_dir


@pytest.fixture
def out_dir(tmp_path):
    entries = [
        _run("standalone", 10.0, 0.0, 1.0),
        _run("time-slicing", 30.0, 2.0, 0.8),
        _run("mps-split", 10.5, 0.05, 0.45),
        _run("tgs", 0, 0, 0, status="unavailable", reason="unavailable: needs agent policy tgs"),
        _run("tally", 0, 0, 0, status="failed", reason="`tally up` failed (status 2): boom"),
    ]
    _write_runs(tmp_path, entries)
    (tmp_path / "environment.json").write_text(json.dumps({"date": "2026-11-25", "gpu": "NVIDIA H100 80GB HBM3",
                                                           "driver": "580.159.04"}))
    return tmp_path


def test_report_writes_table_charts_and_environment(out_dir):
    path = report.write_report(out_dir)
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| bert-infer | gpt2-train |")]
    assert [row.split("|")[4].strip() for row in rows] == ["standalone", "time-slicing", "mps-split", "tgs", "tally"]
    assert "+200.0%" in rows[1] and "(reference)" in rows[0]
    assert "not run: unavailable: needs agent policy tgs" in rows[3]
    assert "failed: `tally up` failed" in rows[4]
    # no numbers for runs that did not happen
    assert rows[3].count(" - ") >= 10
    assert "| driver | 580.159.04 |" in text and "| torch | 2.11.0 |" in text
    assert "| bert-infer | infer | 32 | bf16 | eager | seq=128 |" in text
    for png in ["p99_overhead.png", "system_throughput.png", "cdf__bert-infer__gpt2-train__load0.5.png"]:
        chart = out_dir / "charts" / png
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"charts/{png}" in text
    summary = json.loads((out_dir / "summary.json").read_text())
    assert len(summary) == 5 and all("latencies_ms" not in s.get("hp", {}) for s in summary)


def test_report_without_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(TallyError, match="no runs/ directory"):
        report.write_report(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(TallyError, match="holds no run results"):
        report.write_report(tmp_path)


def test_report_with_only_failed_runs_has_no_charts(tmp_path):
    (tmp_path / "runs").mkdir()
    entry = _run("tally", 0, 0, 0, status="failed", reason="boom")
    (tmp_path / "runs" / "x.json").write_text(json.dumps(entry))
    text = report.write_report(tmp_path).read_text()
    assert "(no successful runs to chart)" in text
    assert not list((tmp_path / "charts").glob("*.png"))


def test_table_shows_the_share_of_be_launches_admitted_alone():
    with_scheduler = _run("tally", 11.0, 0.1, 0.5)
    with_scheduler["scheduler"] = {"be": {"launches": 400, "long_kernels": 50, "be_alone_share": 0.125}}
    rows = report.markdown_table([with_scheduler, _run("mps", 20.0, 1.0, 0.9)]).splitlines()[2:]
    cells = {row.split("|")[4].strip(): [c.strip() for c in row.split("|")] for row in rows}
    column = report.markdown_table([]).splitlines()[0].split("|").index(" BE alone % ")
    assert cells["tally"][column] == "12.5" and cells["mps"][column] == "-"


def test_table_shows_the_be_transformed_fraction_when_the_agent_reported_it():
    block = _run("tally-block", 10.5, 0.05, 0.6)
    block["blocksched"] = {"transformed_fraction": 0.8125, "sliced_launches": 1200, "unsliced_launches": 40,
                           "slices": 9600, "sliced_est_ns": 13_000, "unsliced_est_ns": 3_000, "scope": "process"}
    idle = _run("tally", 11.0, 0.1, 0.5)
    idle["blocksched"] = {"transformed_fraction": None, "sliced_launches": 0}  # nothing gated while HP was there
    plain = _run("tally", 11.0, 0.1, 0.5)
    plain["key"] = {**plain["key"], "load": 0.25}
    plain["blocksched"] = None  # the agent had no block-level counters
    failed = _run("tally-block", 0, 0, 0, status="failed", reason="tally-block: `tally blocksched prepare` failed")
    failed["key"] = {**failed["key"], "load": 0.75}
    table = report.markdown_table([block, idle, plain, failed, _run("mps", 20.0, 1.0, 0.9)])
    header = table.splitlines()[0].split("|")
    column = header.index(" BE sliced % (launches) ")
    assert header[-2].strip() == "status"
    rows = {(r.split("|")[3].strip(), r.split("|")[4].strip()): [c.strip() for c in r.split("|")]
            for r in table.splitlines()[2:]}
    assert rows[("0.5", "tally-block")][column] == "81.2 (1200)"
    window = header.index(" BE sliced launches % (window) ")
    assert rows[("0.5", "tally-block")][window] == "-"  # no scoreboard counters in this run
    block["scheduler"] = {"be": {"launches": 400, "sliced_launches": 300}}
    idle["scheduler"] = {"be": {"launches": 400, "sliced_launches": 0}}
    plain["scheduler"] = {"be": {"launches": 400, "sliced_launches": 0}}
    windowed = {(r.split("|")[3].strip(), r.split("|")[4].strip()): [c.strip() for c in r.split("|")]
                for r in report.markdown_table([block, idle, plain]).splitlines()[2:]}
    assert windowed[("0.5", "tally-block")][window] == "75.0" and windowed[("0.5", "tally")][window] == "0.0"
    assert windowed[("0.25", "tally")][window] == "-"  # no plan: nothing could be sliced
    assert rows[("0.5", "tally")][column] == "- (0)"
    assert rows[("0.25", "tally")][column] == "-" and rows[("0.5", "mps")][column] == "-"
    assert rows[("0.75", "tally-block")][column] == "-"
    assert rows[("0.75", "tally-block")][-2].startswith("failed: tally-block")
    assert all(len(r) == len(header) for r in rows.values())


@pytest.fixture
def repeated(tmp_path):
    """Three output dirs of one matrix (a, b, c), as repeated runs with different seeds leave them."""
    a = _write_runs(tmp_path / "a", [_run("standalone", 10.0, 0.0, 1.0), _run("tally", 11.0, 0.10, 0.40),
                                     _run("mps", 30.0, 2.0, 0.80), _run("mps-split", 11.0, 0.10, 0.50)])
    b = _write_runs(tmp_path / "b", [_run("standalone", 12.0, 0.0, 1.0), _run("tally", 15.6, 0.30, 0.50),
                                     _run("mps", 0, 0, 0, status="failed", reason="worker died | exit 1"),
                                     _run("mps-split", 14.4, 0.20, 0.70)])
    c = _write_runs(tmp_path / "c", [_run("standalone", 8.0, 0.0, 1.0), _run("tally", 8.4, 0.05, 0.45),
                                     _run("mps-split", 8.0, math.nan, 0.60),
                                     _run("tgs", 0, 0, 0, status="unavailable", reason="needs agent policy tgs")])
    return [a, b, c]


def test_combine_groups_runs_and_takes_medians_over_ok_runs(repeated):
    rows = {row["system"]: row for row in report.combine_runs(repeated)}
    assert [row["system"] for row in report.combine_runs(repeated)] == ["standalone", "mps", "mps-split", "tgs",
                                                                       "tally"]
    tally = rows["tally"]
    assert (tally["hp"], tally["be"], tally["load"], tally["ok"]) == ("bert-infer", "gpt2-train", 0.5, 3)
    assert [(e["dir"], e["p99_overhead"], e["be_normalized"]) for e in tally["runs"]] == [
        ("a", 0.10, 0.40), ("b", 0.30, 0.50), ("c", 0.05, 0.45)]
    assert tally["median_p99_overhead"] == 0.10 and tally["median_be_normalized"] == 0.45
    assert rows["standalone"]["median_p99_ms"] == 10.0
    # a failed and an absent run are kept, named, and left out of the median
    mps = rows["mps"]
    assert mps["ok"] == 1 and mps["median_p99_overhead"] == 2.0
    assert [e["status"] for e in mps["runs"]] == ["ok", "failed", "absent"]
    assert mps["runs"][1]["reason"] == "worker died | exit 1"
    # even count: the mean of the two middle values; an ok run without an overhead (NaN) counts
    # as ok but has no value to take the median of
    split = rows["mps-split"]
    assert split["ok"] == 3 and split["runs"][2]["p99_overhead"] is None
    assert split["median_p99_overhead"] == pytest.approx(0.15) and split["median_be_normalized"] == 0.60
    assert rows["tgs"]["ok"] == 0 and rows["tgs"]["median_p99_overhead"] is None
    assert [e["status"] for e in rows["tgs"]["runs"]] == ["absent", "absent", "not run"]


def test_combined_markdown_lists_each_run_medians_ranges_and_what_is_not_ok(repeated):
    text = report.combined_markdown(report.combine_runs(repeated))
    assert "# tally bench: 3 output dirs combined" in text and "in the order a, b, c." in text
    rows = {line.split("|")[4].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| bert-infer |")}
    assert rows["tally"][4:] == ["3/3", "+10.0% / 0.40, +30.0% / 0.50, +5.0% / 0.45", "+10.0% [+5.0%, +30.0%]",
                                 "0.45 [0.40, 0.50]", "-"]
    assert rows["mps"][4:] == ["1/3", "+200.0% / 0.80, failed, absent", "+200.0%", "0.80",
                               "b: failed (worker died / exit 1); c: absent"]
    assert rows["mps-split"][5:8] == ["+10.0% / 0.50, +20.0% / 0.70, - / 0.60", "+15.0% [+10.0%, +20.0%]",
                                      "0.60 [0.50, 0.70]"]
    assert rows["tgs"][4:] == ["0/3", "absent, absent, not run", "-", "-",
                               "a: absent; b: absent; c: not run (needs agent policy tgs)"]
    # standalone has no overhead: only the reference p99
    assert rows["standalone"][5:8] == ["10.00 ms, 12.00 ms, 8.00 ms", "ref. p99 10.00 ms [8.00 ms, 12.00 ms]", "-"]


def test_combine_names_dirs_by_path_when_their_names_collide(tmp_path):
    first = _write_runs(tmp_path / "x" / "out", [_run("tally", 11.0, 0.1, 0.4)])
    second = _write_runs(tmp_path / "y" / "out", [_run("tally", 12.0, 0.2, 0.5)])
    row, = report.combine_runs([first, second])
    assert [e["dir"] for e in row["runs"]] == [str(first), str(second)]


def test_combine_refuses_what_is_not_an_output_dir(tmp_path, repeated):
    with pytest.raises(TallyError, match="is not a directory"):
        report.combine_runs([repeated[0], tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TallyError, match="no runs/ directory"):
        report.combine_runs([repeated[0], tmp_path / "empty"])
    odd = _write_runs(tmp_path / "odd", [])
    (odd / "runs" / "x.json").write_text(json.dumps({"status": "ok"}))
    with pytest.raises(TallyError, match="not a tally bench run"):
        report.combine_runs([repeated[0], odd])
    twice = _write_runs(tmp_path / "twice", [_run("tally", 11.0, 0.1, 0.4)])
    (twice / "runs" / "copy.json").write_text(json.dumps(_run("tally", 11.0, 0.1, 0.4)))
    with pytest.raises(TallyError, match="two runs of bert-infer"):
        report.combine_runs([repeated[0], twice])


def test_cli_combine_prints_the_table_and_writes_combined_md(tmp_path, repeated):
    from click.testing import CliRunner

    from tally.bench import cli as bench_cli

    args = [arg for d in repeated for arg in ("--combine", str(d))]
    result = CliRunner().invoke(bench_cli.bench_command, args + ["--out", str(tmp_path / "summary")])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "summary" / "combined.md").read_text()
    assert "| bert-infer | gpt2-train | 0.5 | tally | 3/3 | +10.0% / 0.40, +30.0% / 0.50, +5.0% / 0.45 |" in written
    assert written in result.output
    for extra, fragment in [([], "does not go with --report-only"), (["--hp", "bert-infer"], "--hp"),
                            (["--seed", "1"], "--seed"), (["--dry-run"], "--dry-run")]:
        more = ["--report-only", str(repeated[0])] if not extra else extra
        result = CliRunner().invoke(bench_cli.bench_command, args + more)
        assert isinstance(result.exception, TallyError), extra
        assert fragment in str(result.exception) and "\n" not in str(result.exception)
    result = CliRunner().invoke(bench_cli.bench_command, ["--combine", str(repeated[0])])
    assert isinstance(result.exception, TallyError) and "two or more" in str(result.exception)
