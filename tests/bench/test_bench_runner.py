"""Orchestration end to end with CPU fake workloads: runs, resume, failures, systems, cleanup, Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tally.bench import runner as runner_mod
from tally.bench import systems
from tally.bench.workloads import FAKE_GPU_LOCK_ENV

FAST = dict(sample_gpu=False, warmup_steps=2, warmup_s=0.0, capacity_s=0.3, arrival_source="poisson",
            stop_grace_s=5.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes (its parent has not reaped it yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def make_runner(out: Path, **overrides) -> runner_mod.Runner:
    config = runner_mod.BenchConfig(out_dir=out, **{"duration_s": 1.0, **FAST, **overrides})
    return runner_mod.Runner(config)


def test_time_slicing_with_fakes_shows_interference_and_leaves_no_process(tmp_path, monkeypatch):
    # the fakes serialize on a file lock, like two contexts time-sliced on one GPU
    monkeypatch.setenv(FAKE_GPU_LOCK_ENV, str(tmp_path / "gpu.lock"))
    runner = make_runner(tmp_path / "out", duration_s=1.5)
    key = runner_mod.RunKey("fake-infer", "fake-train", "time-slicing", 0.5)
    summary = runner.run_matrix([key])[0]
    assert summary["status"] == "ok", summary.get("reason")
    # alone p99 ~ 5 ms service + Poisson queueing; next to 20 ms "kernels" it must wait for them
    assert summary["hp"]["latency"]["p99_ms"] > summary["hp_alone"]["latency"]["p99_ms"] + 5
    assert summary["p99_overhead"] > 0.3
    assert 0.5 < summary["hp_normalized"] < 1.1  # the window ends with the last (delayed) completion
    assert 0 < summary["be_normalized"] < 1.0  # BE steps lose time to HP's
    assert summary["system_throughput"] == pytest.approx(summary["hp_normalized"] + summary["be_normalized"])
    assert len(summary["hp"]["latencies_ms"]) == summary["hp"]["completed"] > 0
    assert runner.processes.spawned_pids and not any(_alive(p) for p in runner.processes.spawned_pids)
    out = tmp_path / "out"
    for rel in ["capacity/fake-infer.json", "arrivals/fake-infer__load0.5.json", "standalone/be__fake-train.json",
                "standalone/hp__fake-infer__load0.5.json", "environment.json", f"runs/{key.run_id}.json"]:
        assert (out / rel).is_file(), rel

    # resume: the same run again starts no process and returns the stored result
    again = make_runner(tmp_path / "out", duration_s=1.5)
    assert again.run_matrix([key])[0]["created"] == summary["created"]
    assert again.processes.spawned_pids == []


NO_BLOCK_LEVEL = "unavailable: needs block-level scheduling in the CLI (test)"


def test_standalone_and_unavailable_systems(tmp_path, monkeypatch):
    # tally-block is unavailable where the CLI lacks the block-level options (as here, by force)
    monkeypatch.setattr(systems, "block_level_missing", lambda: NO_BLOCK_LEVEL)
    runner = make_runner(tmp_path)
    standalone, block = runner.run_matrix([
        runner_mod.RunKey("fake-infer", "fake-train", name, 0.5) for name in ("standalone", "tally-block")])
    assert standalone["status"] == "ok" and standalone["p99_overhead"] == 0.0
    assert block["status"] == "unavailable" and "needs block-level scheduling" in block["reason"]
    assert "p99_overhead" not in block  # never a made-up number
    # unavailable runs are not cached as done: a later tally may have the feature
    key = runner_mod.RunKey("fake-infer", "fake-train", "tally-block", 0.5)
    assert runner_mod._read_ok(runner.run_path(key)) is None


def test_tgs_is_tally_up_with_policy_tgs(monkeypatch):
    from tally.bench import systems

    monkeypatch.setattr(systems, "block_level_missing", lambda: NO_BLOCK_LEVEL)
    tgs = systems.make_system("tgs")
    assert isinstance(tgs, systems.Tally) and tgs.unavailable_reason() is None
    assert tgs.name == "tgs" and tgs.up_args == ["--policy", "tgs"]
    assert "TGS" in tgs.describe()["description"]
    assert systems.make_system("tally-block").unavailable_reason() is not None


def test_system_variants_get_slugged_file_names(tmp_path):
    name = "tally[budget-us=1000;idle-window-us=2000]"
    key = runner_mod.RunKey("fake-infer", "fake-train", name, 0.5)
    assert key.run_id == "fake-infer__fake-train__tally_budget-us-1000_idle-window-us-2000__load0.5"
    assert runner_mod.system_slug("mps-priority") == "mps-priority"
    for bad in "[];= /":
        assert bad not in key.run_id
    runner = make_runner(tmp_path)
    assert runner.run_path(key).name == key.run_id + ".json"
    # a result stored under the old verbatim name is still found when resuming
    legacy = tmp_path / "runs" / f"{key.legacy_run_id}.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text('{"status": "ok", "key": {"system": "%s"}, "created": "then"}' % name)
    assert runner.run(key)["created"] == "then"
    assert runner.processes.spawned_pids == []


def test_run_timing_breaks_down_a_run():
    marks = {"begin": 100.0, "system_up": 101.5, "go": 117.0, "hp_exit": 125.7, "down": 127.0}
    t = runner_mod.run_timing(marks, hp_ready=108.0, be_ready=116.9)
    assert t == {"system_start_s": 1.5, "hp_startup_s": 6.5, "be_startup_s": 15.4, "startup_s": 15.5,
                 "measure_s": 8.7, "teardown_s": 1.3, "total_s": 27.0}
    assert runner_mod.run_timing({"begin": 1.0}, None, None) == {}


def test_overheads_from_earlier_runs(tmp_path):
    import json

    config = runner_mod.BenchConfig(out_dir=tmp_path, startup_estimate_s=3.0, warmup_s=1.0, reuse_workers=False)
    o = runner_mod.Overheads.measured(tmp_path / "runs", config)
    assert o.source == "defaults" and o.startup("bert-infer") == runner_mod.DEFAULT_STARTUP_S["bert-infer"]
    assert o.startup("some.module:make") == 4.0 and o.system_s("tally[budget-us=5]") == o.system_s("tally")
    (tmp_path / "runs").mkdir()
    for i, be_startup in enumerate((10.0, 12.0, 30.0)):
        (tmp_path / "runs" / f"r{i}.json").write_text(json.dumps({
            "status": "ok", "key": {"hp": "bert-infer", "be": "gpt2-train", "system": "mps", "load": 0.5},
            "timing": {"hp_startup_s": 5.0, "be_startup_s": be_startup, "system_start_s": 2.0,
                       "teardown_s": 0.5}}))
    (tmp_path / "runs" / "failed.json").write_text(json.dumps({"status": "failed", "timing": {}}))
    o = runner_mod.Overheads.measured(tmp_path / "runs", config)
    assert o.startup("gpt2-train") == 12.0 and o.startup("bert-infer") == 5.0
    assert o.system_s("mps") == 2.0 and o.teardown_s == 0.5 and o.source.startswith("measured")
    runner = runner_mod.Runner(config)
    keys = [runner_mod.RunKey("bert-infer", "gpt2-train", "mps", 0.5)]
    # capacity + HP alone + BE alone + one co-located run, each startup + its measured part + overheads
    expected = ((5.0 + 3.0 + 0.5) + (5.0 + 20.0 + 0.7 + 0.5) + (12.0 + 20.0 + 0.5)
                + (2.0 + 12.0 + 20.0 + 0.7 + 0.5))
    assert runner.plan_seconds(keys) == pytest.approx(expected)


class FakeMps:
    """Stands in for tally.mps.PrivateMps: records its life, hands out a client env."""

    events: list = []

    def __init__(self, runtime_dir):
        self.runtime_dir = Path(runtime_dir)
        FakeMps.events.append(("init", str(runtime_dir)))

    def __enter__(self):
        FakeMps.events.append(("start",))
        return self

    def __exit__(self, *exc):
        FakeMps.events.append(("stop",))

    def client_env(self):
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.runtime_dir / "pipe")}


def test_mps_systems_start_and_stop_the_daemon_even_when_a_worker_fails(tmp_path):
    FakeMps.events = []
    runner = make_runner(tmp_path, mps_factory=FakeMps, hp_options=["service_ms=abc"])
    summary = runner.run(runner_mod.RunKey("fake-infer", "fake-train", "mps-split", 0.5))
    assert summary["status"] == "failed" and "ValueError" in summary["reason"]
    # the HP capacity measurement failed before any MPS run: nothing started, nothing leaked
    assert FakeMps.events == []
    FakeMps.events = []
    runner = make_runner(tmp_path / "b", mps_factory=FakeMps, be_options=["step_ms=-1"])
    summary = runner.run(runner_mod.RunKey("fake-infer", "fake-train", "mps", 0.5))
    assert summary["status"] == "failed"
    runner = make_runner(tmp_path / "c", mps_factory=FakeMps)
    summary = runner.run(runner_mod.RunKey("fake-infer", "fake-train", "mps-priority", 0.5))
    assert summary["status"] == "ok", summary.get("reason")
    assert [e[0] for e in FakeMps.events] == ["init", "start", "stop"]
    assert not Path(FakeMps.events[0][1]).exists()  # private runtime dir removed
    assert not any(_alive(p) for p in runner.processes.spawned_pids)


def test_system_launch_environments():
    mps = systems.make_system("mps-split", mps_split_percent=30, mps_factory=FakeMps)
    mps.start()
    try:
        assert mps.launch("be").env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in mps.launch("hp").env
        assert "CUDA_MPS_PIPE_DIRECTORY" in mps.launch("hp").env
    finally:
        mps.stop()
    prio = systems.make_system("mps-priority", mps_factory=FakeMps)
    prio.start()
    try:
        assert prio.launch("hp").env[systems.HP_STREAM_PRIORITY_ENV] == "high"
        assert systems.HP_STREAM_PRIORITY_ENV not in prio.launch("be").env
    finally:
        prio.stop()
    assert systems.make_system("time-slicing").launch("hp").env == {}


def test_tally_system_drives_the_cli_and_always_downs(tmp_path):
    log = tmp_path / "calls"
    fake_cli = tmp_path / "fake_tally.py"
    fake_cli.write_text(textwrap.dedent(f"""
        import os, sys
        with open({str(log)!r}, "a") as f:
            f.write(sys.argv[1] + " " + os.environ["TALLY_RUNTIME_DIR"] + "\\n")
        sys.exit(3 if sys.argv[1] == "up" else 0)
    """))
    tally = systems.Tally(tally_command=[sys.executable, str(fake_cli)])
    with pytest.raises(Exception, match=r"`tally up` failed \(status 3\)"):
        tally.start()
    tally.stop()
    calls = log.read_text().split()
    assert calls[0] == "up" and calls[2] == "down" and calls[1] == calls[3]
    tally = systems.Tally(tally_command=["tally"])
    tally._runtime_dir = tmp_path
    assert tally.launch("be").prefix == ["tally", "run", "--priority", "best-effort", "--"]
    assert tally.launch("hp").prefix == ["tally", "run", "--priority", "high", "--"]


RUNNER_SCRIPT = """
import sys
from tally.bench.runner import run_pair
run_pair("fake-infer", "fake-train", "time-slicing", 0.5, 60.0, sys.argv[1], sample_gpu=False,
         warmup_steps=2, warmup_s=0.0, capacity_s=0.3, arrival_source="poisson", stop_grace_s=5.0)
"""


def _default_sigint() -> None:
    """In the runner's child: a suite started in the background (`cmd &` in a script, nohup)
    ignores SIGINT, and an ignored signal stays ignored across exec; Ctrl-C is what is tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_runner_kills_every_worker(tmp_path, sig):
    out = tmp_path / "out"
    # baselines first, quickly, so the interrupted run is the co-located one
    make_runner(out, duration_s=60.0).capacity("fake-infer")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER_SCRIPT, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)
    ready = out / "raw" / "standalone__hp__fake-infer__load0.5"
    deadline = time.monotonic() + 30
    pid = None
    while pid is None:
        assert time.monotonic() < deadline and proc.poll() is None, "runner did not start the HP baseline"
        hp_json_dirs = list(ready.glob("hp.log"))
        if hp_json_dirs:
            time.sleep(0.5)  # the worker is up and serving its 60 s trace
            pid = _child_pids(proc.pid)
        time.sleep(0.05)
    assert pid, "no worker process found"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.2)
    assert not any(_alive(p) for p in pid), "a worker outlived the runner"


def _child_pids(parent: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(parent).children(recursive=True)]
    except psutil.Error:
        return []


def test_tally_variants_pass_their_policy_to_tally_up():
    from tally.bench import systems
    from tally.errors import TallyError

    variant = systems.make_system("tally[budget-us=1000;idle-window-us=2000]")
    assert variant.name == "tally[budget-us=1000;idle-window-us=2000]"
    assert variant.up_args == ["--budget-us", "1000", "--idle-window-us", "2000"]
    assert systems.make_system("tally").up_args == []
    block = systems.make_system("tally-block[budget-us=25]")
    assert isinstance(block, systems.TallyBlock) and block.name == "tally-block[budget-us=25]"
    assert block.up_args == ["--budget-us", "25"] and block.needs_preparation("be")
    for bad in ("tally[budget=1]", "tally[budget-us=fast]", "tally[budget-us]", "tally-block[unthrottle=1]",
                "tally[batch-writes=yes]", "tally[kernel-times]"):
        with pytest.raises(TallyError):
            systems.make_system(bad)


def test_tally_variants_set_agent_switches_for_the_be_client_only():
    from tally.bench import systems

    variant = systems.make_system("tally[batch-writes=1;budget-us=50;kernel-times=0;run-ahead=1;gpu-gate=1]")
    assert variant.up_args == ["--budget-us", "50"]
    variant._runtime_dir = Path("/run/x")  # what start() would have made
    be, hp = variant.launch("be").env, variant.launch("hp").env
    assert be == {"TALLY_RUNTIME_DIR": "/run/x", "TALLY_BATCH_WRITES": "1", "TALLY_KERNEL_TIMES": "0",
                  "TALLY_RUN_AHEAD": "1", "TALLY_GPU_GATE": "1"}
    assert hp == {"TALLY_RUNTIME_DIR": "/run/x"}
    block = systems.make_system("tally-block[batch-writes=1]")
    assert block.agent_env == {"TALLY_BATCH_WRITES": "1"}


def test_tally_variant_can_put_hp_requests_on_the_greatest_stream_priority():
    """The HP program's own choice (what mps-priority does), under tally: set for the HP worker only."""
    from tally.bench import systems
    from tally.errors import TallyError

    variant = systems.make_system("tally[gpu-gate=1;hp-stream-priority=1]")
    variant._runtime_dir = Path("/run/x")
    assert variant.launch("hp").env == {"TALLY_RUNTIME_DIR": "/run/x", systems.HP_STREAM_PRIORITY_ENV: "high"}
    assert systems.HP_STREAM_PRIORITY_ENV not in variant.launch("be").env
    off = systems.make_system("tally[hp-stream-priority=0]")
    off._runtime_dir = Path("/run/x")
    assert off.launch("hp").env == {"TALLY_RUNTIME_DIR": "/run/x"}
    with pytest.raises(TallyError, match="hp-stream-priority is 0 or 1"):
        systems.make_system("tally[hp-stream-priority=high]")


def test_tally_variant_can_cap_the_be_clients_share_of_sms():
    from tally.bench import systems
    from tally.errors import TallyError

    variant = systems.make_system("tally[be-thread-percent=80]")
    variant._runtime_dir = Path("/run/x")
    assert variant.launch("be").env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "80"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in variant.launch("hp").env
    for bad in ("0", "101", "80.5", "most"):
        with pytest.raises(TallyError, match="whole percentage 1..100"):
            systems.make_system(f"tally[be-thread-percent={bad}]")


# ---------------------------------------------------------------- reused workers


def test_reused_workers_start_once_per_system_and_give_the_same_results(tmp_path, monkeypatch):
    monkeypatch.setattr(systems, "block_level_missing", lambda: NO_BLOCK_LEVEL)
    FakeMps.events = []
    runner = make_runner(tmp_path / "out", mps_factory=FakeMps)
    keys = [runner_mod.RunKey(hp, be, system, 0.5)
            for hp in ("fake-infer", "fake-infer@sleep") for be in ("fake-train", "fake-train@sleep")
            for system in ("standalone", "time-slicing", "mps", "tally-block")]
    results = runner.run_matrix(keys)
    assert [r["run_id"] for r in results] == [k.run_id for k in keys]  # in the caller's order
    by_status = {}
    for r in results:
        by_status.setdefault(r["status"], []).append(r["key"]["system"])
    assert sorted(by_status) == ["ok", "unavailable"], [r.get("reason") for r in results]
    # 2 HP + 2 BE workers for baselines and time-slicing, 2 + 2 more under mps: 8, not 2 per run
    starts = runner.worker_starts
    assert sorted(s[0] for s in starts) == ["mps"] * 4 + ["standalone"] * 4
    assert len(set(starts)) == 8
    assert [e[0] for e in FakeMps.events] == ["init", "start", "stop"]  # one daemon for all mps runs
    one_shot = make_runner(tmp_path / "one", mps_factory=FakeMps, reuse_workers=False)
    reference = one_shot.run(runner_mod.RunKey("fake-infer", "fake-train", "mps", 0.5))
    for r in results:
        if r["status"] != "ok":
            continue
        assert set(reference) - {"timing"} <= set(r) - {"worker_reused", "workers"}
        if r["key"]["system"] != "standalone":
            assert r["worker_reused"]["hp"] or r["worker_reused"]["be"] or r["timing"].get("hp_startup_s")
            assert set(r["timing"]) >= {"startup_s", "measure_s", "teardown_s", "hp_worker_startup_s"}
            assert 0.9 < r["timing"]["measure_s"] < 2.5 and r["hp"]["completed"] > 0
            assert r["be"]["steps_per_s"] > 0
    assert not any(_alive(p) for p in runner.processes.spawned_pids)
    # resume: nothing is started again
    again = make_runner(tmp_path / "out", mps_factory=FakeMps)
    ok = [r["status"] == "ok" for r in results]
    redo = again.run_matrix(keys)
    assert [r["created"] for r, done in zip(redo, ok) if done] == [r["created"] for r, done in zip(results, ok) if done]
    assert again.processes.spawned_pids == [] and again.worker_starts == []


def test_a_killed_reused_worker_fails_only_its_run_and_is_restarted(tmp_path):
    runner = make_runner(tmp_path, duration_s=1.0)
    keys = [runner_mod.RunKey("fake-infer", be, "time-slicing", 0.5) for be in ("fake-train", "fake-train@sleep")]
    keys.append(runner_mod.RunKey("fake-infer", "fake-train", "time-slicing", 0.25))
    killed = []
    original = runner._window

    def window(key, pool, system=None):
        if key == keys[0]:
            # the HP worker dies in the middle of the first window
            import threading

            victim = pool.get("hp", "fake-infer") if ("hp", "fake-infer") in pool.live else None

            def kill():
                time.sleep(0.5)
                handle = pool.get("hp", "fake-infer")
                killed.append(handle.proc.pid)
                os.kill(handle.proc.pid, signal.SIGKILL)

            assert victim is not None
            threading.Thread(target=kill, daemon=True).start()
        return original(key, pool, system)

    runner._window = window
    results = runner.run_matrix(keys)
    assert killed
    assert results[0]["status"] == "failed" and "hp worker (fake-infer) died" in results[0]["reason"]
    assert results[1]["status"] == "ok" and results[2]["status"] == "ok", [r.get("reason") for r in results]
    hp_starts = [s for s in runner.worker_starts if s[1] == "hp"]
    assert len(hp_starts) == 2  # restarted once for the next run
    assert not any(_alive(p) for p in runner.processes.spawned_pids)
    # the failed run is redone on resume, the others are skipped
    again = make_runner(tmp_path, duration_s=1.0)
    redo = again.run_matrix(keys)
    assert redo[0]["status"] == "ok", redo[0].get("reason")
    assert redo[1]["created"] == results[1]["created"]
    assert {s[1:] for s in again.worker_starts} == {("hp", "fake-infer"), ("be", "fake-train")}


def test_a_worker_that_cannot_start_fails_its_runs_only(tmp_path):
    FakeMps.events = []
    runner = make_runner(tmp_path, mps_factory=FakeMps, be_options=["step_ms=-1"])
    results = runner.run_matrix([runner_mod.RunKey("fake-infer", "fake-train", s, 0.5) for s in ("mps", "standalone")])
    assert all(r["status"] == "failed" for r in results)
    assert "BE alone" in results[0]["reason"] or "be" in results[0]["reason"]
    assert not any(_alive(p) for p in runner.processes.spawned_pids)


REUSE_SCRIPT = """
import sys
from tally.bench.runner import BenchConfig, Runner, RunKey
runner = Runner(BenchConfig(out_dir=sys.argv[1], duration_s=60.0, sample_gpu=False, warmup_steps=2, warmup_s=0.0,
                            capacity_s=0.3, arrival_source="poisson", stop_grace_s=5.0))
runner.run_matrix([RunKey("fake-infer", "fake-train", "time-slicing", 0.5)])
"""


def test_interrupting_a_reused_run_kills_every_worker(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", REUSE_SCRIPT, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 30
    pids: list = []
    while not (out / "raw" / "standalone__hp__fake-infer__load0.5" / "go").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the HP baseline did not start"
        time.sleep(0.05)
    time.sleep(0.3)
    pids = _child_pids(proc.pid)
    assert len(pids) >= 2  # an HP and a (paused) BE worker
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived the runner"


def test_plan_with_reuse_fits_the_quick_budget(tmp_path):
    config = runner_mod.BenchConfig(out_dir=tmp_path, duration_s=8.0, capacity_s=2.0)
    runner = runner_mod.Runner(config)
    from tally.bench.cli import QUICK, build_plan
    from tally.bench.systems import SYSTEM_NAMES

    # the documented budget is without tally-block (its capture + prepare per BE workload come on top)
    keys = build_plan(QUICK["hp"], QUICK["be"], [s for s in SYSTEM_NAMES if s != "tally-block"], QUICK["loads"],
                      False)
    reused = runner.plan_seconds(keys)
    runner.config.reuse_workers = False
    assert reused < 8 * 60 < runner.plan_seconds(keys)
