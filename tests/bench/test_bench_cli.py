"""`tally bench` command line: the one-line no-GPU error, fake-only runs, report-only, plans."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tally.bench import cli as bench_cli
from tally.errors import TallyError


def _tally(args, env_extra=None, path=None):
    env = {k: v for k, v in os.environ.items() if k != bench_cli.ALLOW_NO_GPU_ENV}
    env.update(env_extra or {})
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "tally", "bench", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.skipif(bench_cli.gpu_present(), reason="this machine has an NVIDIA GPU")
def test_no_gpu_is_one_line_error_before_anything_else(tmp_path):
    out = tmp_path / "out"
    result = _tally(["--hp", "bert-infer", "--be", "gpt2-train", "--out", str(out)])
    assert result.returncode == 2
    assert result.stderr.startswith("tally: error: no NVIDIA GPU found")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert not out.exists()
    # the escape hatch for tests is honoured only when every workload is a fake
    result = _tally(["--hp", "bert-infer", "--be", "fake-train", "--out", str(out)],
                    {bench_cli.ALLOW_NO_GPU_ENV: "1"})
    assert result.returncode == 2 and "no NVIDIA GPU found" in result.stderr
    assert not out.exists()


def test_gpu_check_is_injectable(monkeypatch):
    from tally.bench import workloads as registry

    monkeypatch.setattr(bench_cli, "gpu_present", lambda: False)
    monkeypatch.setenv(bench_cli.ALLOW_NO_GPU_ENV, "1")
    bench_cli.require_gpu([registry.parse_ref("fake-infer")])  # fakes only: allowed
    with pytest.raises(TallyError, match="no NVIDIA GPU found"):
        bench_cli.require_gpu([registry.parse_ref("fake-infer"), registry.parse_ref("micro-be")])
    monkeypatch.setattr(bench_cli, "gpu_present", lambda: True)
    bench_cli.require_gpu([registry.parse_ref("bert-infer")])


def test_fake_run_end_to_end_writes_results_and_report(tmp_path):
    out = tmp_path / "out"
    # (tally-block's 'not run' row: test_bench_runner, with the CLI's block-level options forced absent)
    result = _tally(["--hp", "fake-infer", "--be", "fake-train", "--systems", "standalone,time-slicing",
                     "--duration", "1", "--arrivals", "poisson", "--out", str(out)],
                    {bench_cli.ALLOW_NO_GPU_ENV: "1"})
    assert result.returncode == 0, result.stderr
    assert "2 runs" in result.stderr
    report = (out / "report.md").read_text()
    assert "| fake-infer | fake-train | 0.5 | time-slicing |" in report
    assert "| fake-infer | fake-train | 0.5 | standalone |" in report
    assert (out / "charts" / "p99_overhead.png").is_file()
    # --report-only rewrites the report from the stored runs, no GPU needed
    (out / "report.md").unlink()
    result = _tally(["--report-only", str(out)])
    assert result.returncode == 0 and (out / "report.md").is_file()


def test_plan_presets_and_parts():
    runner = CliRunner()
    result = runner.invoke(bench_cli.bench_command, ["--quick", "--dry-run"])
    assert result.exit_code == 0, result.output
    run_ids = [line for line in result.output.splitlines() if "__load" in line]
    assert len(run_ids) == 2 * 2 * 8
    result = runner.invoke(bench_cli.bench_command, ["--paper", "--dry-run"])
    paper = [line for line in result.output.splitlines() if "__load" in line]
    assert len(paper) == (5 * 6 + 2 * 2) * 8
    parts = []
    for index in (1, 2, 3):
        result = runner.invoke(bench_cli.bench_command, ["--paper", "--dry-run", "--part", f"{index}/3"])
        parts += [line for line in result.output.splitlines() if "__load" in line]
    assert sorted(parts) == sorted(paper)
    result = runner.invoke(bench_cli.bench_command, ["--paper", "--dry-run", "--part", "4/3"])
    assert isinstance(result.exception, TallyError)


def test_bad_selections_are_one_line_errors():
    runner = CliRunner()
    for args, fragment in [
        (["--hp", "gpt2-train", "--be", "resnet50-train", "--dry-run"], "role hp needs infer"),
        (["--hp", "bert-infer", "--be", "resnet50-train", "--systems", "magic", "--dry-run"], "unknown system"),
        (["--dry-run"], "give --hp and --be"),
        (["--quick", "--paper", "--dry-run"], "exclude each other"),
    ]:
        result = runner.invoke(bench_cli.bench_command, args)
        assert isinstance(result.exception, TallyError), args
        assert fragment in str(result.exception) and "\n" not in str(result.exception)


def test_dry_run_estimate_uses_measured_overheads(tmp_path):
    """The printed estimate comes from per-run overheads: the H100 defaults, or what an output
    dir's earlier runs measured."""
    import json

    from tally.bench import runner as runner_mod

    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(bench_cli.bench_command, ["--quick", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "per-run overheads: defaults" in result.output
    default_min = float(result.output.split("estimated ")[1].split(" min")[0])
    # a run measured with slow startups makes the estimate grow
    key = runner_mod.RunKey("bert-infer", "resnet50-train", "mps", 0.5)
    (out / "runs").mkdir(parents=True)
    (out / "runs" / f"{key.run_id}.json").write_text(json.dumps({
        "status": "ok", "key": key.__dict__,
        "timing": {"hp_startup_s": 30.0, "be_startup_s": 60.0, "system_start_s": 1.0, "teardown_s": 1.0}}))
    result = runner.invoke(bench_cli.bench_command, ["--quick", "--dry-run", "--out", str(out)])
    assert "per-run overheads: measured" in result.output
    assert float(result.output.split("estimated ")[1].split(" min")[0]) > default_min + 5
