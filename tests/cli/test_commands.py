"""The `tally` command line: argument errors are one line and non-zero, and
`tally run` hands the program its exit status, signals and stdio untouched."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

TALLY = [sys.executable, "-m", "tally"]


def tally(*args, **kw):
    return subprocess.run([*TALLY, *args], capture_output=True, text=True, timeout=60, **kw)


def assert_one_line_error(r, *fragments):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tally: error: ")
    for f in fragments:
        assert f in lines[0]
    assert "Traceback" not in r.stderr


def test_help_lists_every_command():
    r = tally("--help")
    assert r.returncode == 0
    for name in ("run", "trace", "doctor", "ptx", "up", "down", "status", "bench"):
        assert f"  {name} " in r.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["frobnicate"], "No such command"),
        (["run"], "Missing argument"),
        (["run", "--priority", "urgent", "--", "true"], "'urgent' is not one of"),
        (["run", "--", "no-such-program-xyz"], "command not found: no-such-program-xyz"),
        (["trace"], "nothing to trace"),
        (["trace", "--summary", "/nonexistent/trace.jsonl"], "cannot read trace"),
        (["trace", "--summary", "x.jsonl", "--", "true"], "not both"),
        (["trace", "--top", "0", "--summary", "x.jsonl"], "--top"),
        (["run", "--run-ahead", "--", "true"], "--run-ahead needs --priority best-effort"),
        (["run", "--priority", "high", "--run-ahead", "--", "true"], "--run-ahead needs --priority best-effort"),
        (["run", "--priority", "high", "--gpu-gate", "--", "true"], "--gpu-gate needs --priority best-effort"),
        (["run", "--no-gpu-gate", "--", "true"], "--no-gpu-gate needs --priority best-effort"),
        (["run", "--priority", "best-effort", "--run-ahead", "--gpu-gate", "--", "true"], "pick one"),
    ],
)
def test_argument_errors_are_one_line(args, fragment):
    assert_one_line_error(tally(*args), fragment)


def test_command_not_found_exits_127():
    assert tally("run", "--", "no-such-program-xyz").returncode == 127


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_run_propagates_exit_code(code):
    assert tally("run", "--", "sh", "-c", f"exit {code}").returncode == code


def test_run_propagates_death_by_signal():
    r = tally("run", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == -signal.SIGTERM


def test_run_keeps_stdin_stdout_and_pid():
    # exec, not a child: the program reports the pid tally was started with.
    proc = subprocess.Popen([*TALLY, "run", "--", "sh", "-c", "cat; echo pid=$$"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate("hello\n", timeout=60)
    assert out == f"hello\npid={proc.pid}\n"


def test_run_injects_the_agent_and_the_cupti_search_list():
    r = tally("run", "--", "sh", "-c", "echo $CUDA_INJECTION64_PATH; echo ${TALLY_CHAINED_INJECTION:-none}")
    injected, chained = r.stdout.split()
    assert injected.endswith("libtally_agent.so") and os.path.isfile(injected)
    assert chained == "none"


def test_run_chains_an_existing_injection():
    env = dict(os.environ, CUDA_INJECTION64_PATH="/opt/profiler/libinject.so")
    r = tally("run", "--", "sh", "-c", "echo $TALLY_CHAINED_INJECTION", env=env)
    assert r.stdout.strip() == "/opt/profiler/libinject.so"


def test_priority_without_daemon_says_how_to_start_one(tmp_path):
    env = dict(os.environ, TALLY_RUNTIME_DIR=str(tmp_path / "rt"), TALLY_SHM_DIR=str(tmp_path))
    r = tally("run", "--priority", "best-effort", "--", "true", env=env)
    assert_one_line_error(r, "tally up", "--auto-up")


def test_doctor_reports_without_traceback():
    r = tally("doctor", "--json")
    assert "Traceback" not in r.stderr
    import json

    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["tally agent"]["ok"]
    # Without a driver the doctor fails and says how to fix it.
    if not checks["CUDA driver"]["ok"]:
        assert r.returncode == 1
        assert checks["CUDA driver"]["fix"]


def test_run_save_modules_points_the_agent_at_the_cache(monkeypatch, tmp_path):
    """`tally run --save-modules` hands the agent TALLY_MODULE_DIR under the cache dir; without the
    flag the agent saves nothing; a TALLY_MODULE_DIR the user set wins."""
    from click.testing import CliRunner

    from tally import launcher

    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TALLY_MODULE_DIR", raising=False)
    seen = {}
    monkeypatch.setattr(launcher, "exec_command", lambda command, env: seen.update(env))
    assert CliRunner().invoke(launcher.run_command, ["--save-modules", "--", "/bin/true"]).exit_code == 0
    assert seen["TALLY_MODULE_DIR"] == str(tmp_path / "cache" / "modules")
    seen.clear()
    assert CliRunner().invoke(launcher.run_command, ["--", "/bin/true"]).exit_code == 0
    assert "TALLY_MODULE_DIR" not in seen
    monkeypatch.setenv("TALLY_MODULE_DIR", "/my/own")
    CliRunner().invoke(launcher.run_command, ["--save-modules", "--", "/bin/true"])
    assert seen["TALLY_MODULE_DIR"] == "/my/own"


def test_run_ahead_turns_the_agent_switch_on_for_best_effort_only(monkeypatch):
    """`tally run --priority best-effort --run-ahead` hands the agent TALLY_RUN_AHEAD=1 (the daemon is
    faked); without the flag the switch is not set."""
    from click.testing import CliRunner

    import tally.daemon.client as client
    from tally import launcher

    monkeypatch.delenv("TALLY_RUN_AHEAD", raising=False)
    monkeypatch.setattr(client, "ensure_daemon", lambda auto_up=False: {})
    monkeypatch.setattr(client, "client_env", lambda state, priority: {})
    seen = {}
    monkeypatch.setattr(launcher, "exec_command", lambda command, env: seen.update(env))
    r = CliRunner().invoke(launcher.run_command, ["--priority", "best-effort", "--run-ahead", "--", "/bin/true"])
    assert r.exit_code == 0, r.output
    assert seen["TALLY_RUN_AHEAD"] == "1"
    assert seen["TALLY_GPU_GATE"] == "0"  # run-ahead is the other way of waiting on the GPU
    seen.clear()
    assert CliRunner().invoke(launcher.run_command, ["--priority", "best-effort", "--", "/bin/true"]).exit_code == 0
    assert "TALLY_RUN_AHEAD" not in seen


def test_gpu_gate_is_on_by_default_for_best_effort(monkeypatch):
    """Best effort gets TALLY_GPU_GATE=1 unless --no-gpu-gate or the user's own TALLY_GPU_GATE says
    otherwise; high priority never gets the switch."""
    from click.testing import CliRunner

    import tally.daemon.client as client
    from tally import launcher

    for variable in ("TALLY_GPU_GATE", "TALLY_RUN_AHEAD", "TALLY_BLOCKSCHED_PLAN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(client, "ensure_daemon", lambda auto_up=False: {})
    monkeypatch.setattr(client, "client_env", lambda state, priority: {})
    seen = {}
    monkeypatch.setattr(launcher, "exec_command", lambda command, env: seen.update(env))

    def gate(*args: str) -> str | None:
        seen.clear()
        r = CliRunner().invoke(launcher.run_command, [*args, "--", "/bin/true"])
        assert r.exit_code == 0, r.output
        return seen.get("TALLY_GPU_GATE")

    assert gate("--priority", "best-effort") == "1"
    assert gate("--priority", "best-effort", "--gpu-gate") == "1"
    assert gate("--priority", "best-effort", "--no-gpu-gate") == "0"
    assert gate("--priority", "high") is None
    monkeypatch.setenv("TALLY_GPU_GATE", "0")
    assert gate("--priority", "best-effort") == "0"  # the user's own setting wins over the default
    assert gate("--priority", "best-effort", "--gpu-gate") == "1"  # and the flag over it
    monkeypatch.delenv("TALLY_GPU_GATE")
    monkeypatch.setenv("TALLY_RUN_AHEAD", "1")  # run-ahead set in the environment (tally bench's variants)
    assert gate("--priority", "best-effort") == "0"
    r = CliRunner().invoke(launcher.run_command, ["--priority", "best-effort", "--gpu-gate", "--", "/bin/true"])
    assert r.exit_code != 0 and "pick one" in str(r.exception)  # as --run-ahead --gpu-gate
    monkeypatch.delenv("TALLY_RUN_AHEAD")
    monkeypatch.setenv("TALLY_BLOCKSCHED_PLAN", "/plans/plan")  # block-level: slices take the launch-level gate
    assert gate("--priority", "best-effort") == "0"
    assert gate("--priority", "best-effort", "--gpu-gate") == "1"
