"""Block-level scheduling in the bench: the PTX micro workloads, the tally-block system's command
sequence (capture, prepare, block-level run) through a fake tally CLI, its failures, and the BE
transformed fraction from the agent's stats in run JSONs and the report."""
from __future__ import annotations

import ctypes
import json
import sys
import textwrap
from pathlib import Path

import pytest

from tally.bench import micro, report, systems
from tally.bench import runner as runner_mod
from tally.bench import workloads as registry
from tally.errors import TallyError

FAST = dict(sample_gpu=False, warmup_steps=2, warmup_s=0.0, capacity_s=0.3, arrival_source="poisson",
            stop_grace_s=5.0, duration_s=1.0)

BLOCKSCHED_STATS = {"plan_kernels": 1, "sliced_launches": 30, "slices": 120, "unsliced_launches": 10,
                    "sliced_est_ns": 3000, "unsliced_est_ns": 1000, "refused": {"no-ptx": 2}}

# A stand-in for `python -m tally`: logs every call (argv and the cache/module dirs it got), runs
# `run`'s command as a child (so it can write the agent's stats file after it, as the agent does at
# exit), saves a code image for --save-modules, and writes the plan for `blocksched prepare`.
FAKE_TALLY = textwrap.dedent(f"""
    import json, os, signal, subprocess, sys
    args = sys.argv[1:]

    def note():
        with open(os.environ["FAKE_TALLY_LOG"], "a") as f:
            f.write(json.dumps({{"argv": args, "cache": os.environ.get("TALLY_CACHE_DIR"),
                                "modules": os.environ.get("TALLY_MODULE_DIR")}}) + "\\n")

    verb = args[0]
    if verb in ("up", "down"):
        note()
        sys.exit(0)
    if verb == "status":
        sys.exit(1)  # no counters: the bench does without them
    if verb == "blocksched":
        note()
        if os.environ.get("FAKE_PREPARE_FAIL"):
            print("transforming 1 image", flush=True)
            print("tally: error: prepare exploded", file=sys.stderr)
            sys.exit(2)
        plan = args[args.index("--plan") + 1]
        cubin = os.path.join(os.path.dirname(plan), "cubins", "00000000000000aa.cubin")
        os.makedirs(os.path.dirname(cubin), exist_ok=True)
        open(cubin, "wb").close()
        with open(plan, "w") as f:
            f.write("tally-blocksched-plan 1\\n")
            if not os.environ.get("FAKE_PLAN_EMPTY"):
                f.write(f"slice 0123456789abcdef work 2 00000000000000aa {{cubin}}\\n")
        print("1 kernel transformed")
        sys.exit(0)
    assert verb == "run", args
    note()
    options, command = args[1:args.index("--")], args[args.index("--") + 1:]
    if "--save-modules" in options:
        os.makedirs(os.environ["TALLY_MODULE_DIR"], exist_ok=True)
        with open(os.path.join(os.environ["TALLY_MODULE_DIR"], "0001.img"), "wb") as f:
            f.write(b".version 8.0")
    signal.signal(signal.SIGTERM, lambda *a: None)  # the worker (same process group) gets it and stops
    rc = subprocess.call(command)
    if "--stats-dir" in options:
        stats = {{"pid": os.getpid(), "kernel_launches": 40}}
        if "--block-level" in options:
            stats["blocksched"] = {json.dumps(BLOCKSCHED_STATS)}
        path = os.path.join(options[options.index("--stats-dir") + 1], f"stats-{{os.getpid()}}.json")
        with open(path, "w") as f:
            f.write(json.dumps(stats))
    sys.exit(rc)
""")


@pytest.fixture
def fake_tally(tmp_path, monkeypatch):
    script = tmp_path / "fake_tally.py"
    script.write_text(FAKE_TALLY)
    log = tmp_path / "tally-calls.jsonl"
    monkeypatch.setenv("FAKE_TALLY_LOG", str(log))
    monkeypatch.delenv("FAKE_PREPARE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_PLAN_EMPTY", raising=False)
    monkeypatch.delenv("TALLY_MODULE_DIR", raising=False)
    # this checkout's CLI may not have the block-level options yet; the fake has them
    monkeypatch.setattr(systems, "block_level_missing", lambda: None)
    monkeypatch.setattr(systems, "gpu_arch", lambda: "sm_90")

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return [sys.executable, str(script)], calls


def make_runner(out: Path, command: list[str], **overrides) -> runner_mod.Runner:
    return runner_mod.Runner(runner_mod.BenchConfig(out_dir=out, tally_command=command, **{**FAST, **overrides}))


def _opts(call: dict) -> list[str]:
    argv = call["argv"]
    return argv[:argv.index("--")] if "--" in argv else argv


# ---------------------------------------------------------------- workloads


def test_ptx_micro_workloads_are_registered_with_micro_be_shapes():
    be, ptx, short = (registry.REGISTRY[n] for n in ("micro-be", "micro-be-ptx", "micro-be-short"))
    assert be.details == {"kernels_per_step": 4, "blocks": 2112, "threads": 256, "iters": 20000}  # unchanged
    assert registry.REGISTRY["micro-hp"].details == {"kernels": 20, "blocks": 264, "threads": 128, "iters": 2000}
    assert ptx.details == {**be.details, "image": "ptx"}
    assert short.details == {"kernels_per_step": 4, "blocks": 2112 * 16, "threads": 256, "iters": 20000 // 16,
                             "image": "ptx"}
    # the same work per kernel: blocks x iterations
    assert short.details["blocks"] * short.details["iters"] == be.details["blocks"] * be.details["iters"]
    for spec in (ptx, short):
        assert spec.kind == registry.TRAIN and spec.factory == "tally.bench.micro:micro_be" and not spec.fake
        assert registry.parse_ref(spec.name, role="be").variant == "ptx"
        with pytest.raises(TallyError, match="role hp needs infer"):
            registry.parse_ref(spec.name, role="hp")
    assert "micro-be-short" not in registry.real_workloads(registry.TRAIN)


class _FakeDriverLib:
    def __init__(self, load_rc):
        self.load_rc = load_rc
        self.loaded = None

    def cuModuleLoadData(self, module, image):
        self.loaded = image
        return self.load_rc

    def cuDriverGetVersion(self, version):
        version._obj.value = 12080
        return 0


class _FakeDriver:
    """micro.Driver without a GPU: every call succeeds; compute capability 9.0."""

    load_rc = 0
    arch = micro.Driver.arch  # the real one, over the fake calls below

    def __init__(self):
        self.lib = _FakeDriverLib(self.load_rc)

    def check(self, rc, what):
        if rc:
            raise TallyError(f"{what} failed: {rc}")

    def __getattr__(self, name):
        def call(*args):
            if name == "cuDeviceGetAttribute":
                args[0]._obj.value = 9 if args[1] == micro.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR else 0

        return call


PTX = b"//\n// Generated by NVIDIA NVVM Compiler\n.version 9.1\n.target compute_90\n.address_size 64\n"


def test_ptx_image_is_compiled_for_the_virtual_arch_and_loaded_nul_terminated(monkeypatch):
    compiled = []

    def compile_kernel(arch, nvrtc=None):
        compiled.append(arch)
        return (micro.ptx_image(PTX + b"\0\0"), "ptx") if arch.startswith("compute_") else (b"\x7fELF", "cubin")

    monkeypatch.setattr(micro, "compile_kernel", compile_kernel)
    monkeypatch.setattr(micro, "Driver", _FakeDriver)
    gpu = micro.MicroKernels(False, "ptx")
    assert compiled == ["compute_90"] and gpu.arch == "sm_90" and gpu.image_kind == "ptx"
    assert gpu.drv.lib.loaded == PTX + b"\0"  # the text and exactly one NUL
    micro.MicroKernels(False)
    assert compiled[-1] == "sm_90"  # micro-hp / micro-be: a cubin for the exact architecture, as before
    with pytest.raises(TallyError, match="image must be one of"):
        micro.MicroKernels(False, "fatbin")


def test_unsupported_ptx_version_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(micro, "compile_kernel", lambda arch, nvrtc=None: (micro.ptx_image(PTX), "ptx"))
    monkeypatch.setattr(micro, "Driver", type("D", (_FakeDriver,), {"load_rc": micro.CUDA_ERROR_UNSUPPORTED_PTX_VERSION}))
    spec = registry.REGISTRY["micro-be-short"]
    with pytest.raises(TallyError) as info:
        micro.micro_be(spec, "ptx", {})
    message = str(info.value)
    assert "\n" not in message
    assert "CUDA_ERROR_UNSUPPORTED_PTX_VERSION" in message and ".version 9.1" in message and "CUDA 12.8" in message
    assert micro.ptx_version(PTX) == "9.1" and micro.ptx_version(b"no version") is None


# ---------------------------------------------------------------- the system on its own


def test_tally_block_prepares_once_per_be_workload_and_launches_with_the_plan(tmp_path, fake_tally):
    command, calls = fake_tally
    block = systems.make_system("tally-block", tally_command=command)
    assert isinstance(block, systems.TallyBlock) and block.unavailable_reason() is None
    assert block.needs_preparation("be") and not block.needs_preparation("hp")
    block._runtime_dir = tmp_path / "rt"
    runs = []

    def execute(argv, env, log, timeout_s):
        import os
        import subprocess

        runs.append((argv, timeout_s))
        with open(log, "w") as out:
            return subprocess.call(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)

    worker = [sys.executable, "-c", "print('one step')"]
    work = tmp_path / "work"
    block.prepare_role("be", "micro-be-short", work, worker, execute, 77.0)
    block.prepare_role("be", "micro-be-short", work, worker, execute, 77.0)  # once per workload
    assert len(runs) == 2
    capture, prepare = calls()
    assert capture["argv"][:capture["argv"].index("--")] == ["run", "--priority", "best-effort", "--save-modules"]
    assert capture["argv"][capture["argv"].index("--") + 1:][:4] == worker + ["--warmup-steps"]
    assert capture["cache"] == str(work / "cache") and capture["modules"] == str(work / "cache" / "modules")
    assert prepare["argv"] == ["blocksched", "prepare", "--modules", str(work / "cache" / "modules"),
                               "--compile", "sm_90", "--modes", "slice", "--plan", str(work / "plan")]
    assert runs[0][1] == 77.0 and runs[1][1] == block.prepare_timeout_s == 300.0
    assert (work / "prepare.log").read_text().strip() == "1 kernel transformed"  # the report is kept
    launch = block.launch("be", "micro-be-short", stats_dir=tmp_path / "stats")
    assert launch.prefix == command + ["run", "--priority", "best-effort", "--block-level", "--plan",
                                       str(work / "plan"), "--stats-dir", str(tmp_path / "stats"), "--"]
    assert launch.env["TALLY_CACHE_DIR"] == str(work / "cache")
    assert "TALLY_MODULE_DIR" not in launch.env and launch.unset == ("TALLY_MODULE_DIR",)  # no saving when measured
    assert block.launch("hp", "micro-hp").prefix == command + ["run", "--priority", "high", "--"]
    with pytest.raises(TallyError, match="has no plan"):
        block.launch("be", "micro-be")
    assert block.describe()["plans"] == {"micro-be-short": {"plan": str(work / "plan"), "kernels": 1}}


def test_tally_block_failures_are_one_line_and_remembered(tmp_path, fake_tally, monkeypatch):
    command, calls = fake_tally
    block = systems.TallyBlock(tally_command=command)
    block._runtime_dir = tmp_path / "rt"

    def execute(argv, env, log, timeout_s):
        import os
        import subprocess

        with open(log, "w") as out:
            return subprocess.call(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)

    # a capture that saves nothing
    no_modules = [sys.executable, "-c", "pass"]
    monkeypatch.setattr(block, "tally_command", [sys.executable, "-c", "import sys; sys.exit(0)"])
    with pytest.raises(TallyError, match="saved no code image"):
        block.prepare_role("be", "x", tmp_path / "a", no_modules, execute, 10)
    monkeypatch.setattr(block, "tally_command", command)
    # a capture whose worker fails: the error in its result file is the reason
    result = tmp_path / "capture-be.json"
    result.write_text(json.dumps({"error": "the driver cannot JIT the micro kernel's PTX (...)"}))
    with pytest.raises(TallyError, match=r"capture run of w failed \(status 1\): the driver cannot JIT"):
        block.prepare_role("be", "w", tmp_path / "w", [sys.executable, "-c", "import sys; sys.exit(1)", "--result",
                                                       str(result)], execute, 10)
    # ... else its last line
    failing = [sys.executable, "-c", "import sys; print('tally bench worker: no NVRTC', file=sys.stderr); sys.exit(1)"]
    with pytest.raises(TallyError, match=r"capture run of y failed \(status 1\): tally bench worker: no NVRTC"):
        block.prepare_role("be", "y", tmp_path / "b", failing, execute, 10)
    # a plan without kernels would be a launch-level run under tally-block's name
    monkeypatch.setenv("FAKE_PLAN_EMPTY", "1")
    with pytest.raises(TallyError, match=r"put no kernel of e in the plan \(nothing to slice"):
        block.prepare_role("be", "e", tmp_path / "e", [sys.executable, "-c", "pass"], execute, 10)
    # prepare fails: once, then the same reason without running anything again
    monkeypatch.setenv("FAKE_PREPARE_FAIL", "1")
    ok_worker = [sys.executable, "-c", "pass"]
    for _ in range(2):
        with pytest.raises(TallyError) as info:
            block.prepare_role("be", "z", tmp_path / "c", ok_worker, execute, 10)
        assert str(info.value) == ("tally-block: `tally blocksched prepare` for z failed (status 2): "
                                   "tally: error: prepare exploded")
    assert [c["argv"][-1] for c in calls() if c["argv"][0] == "blocksched"] == [str(tmp_path / "e" / "plan"),
                                                                                str(tmp_path / "c" / "plan")]


def test_block_level_availability_follows_the_cli(monkeypatch):
    import click

    from tally import launcher
    from tally.blocksched import cli as bcli

    reason = systems.block_level_missing()
    run_opts = {o for p in launcher.run_command.params for o in p.opts}
    prepare_opts = {o for p in bcli.blocksched_group.commands["prepare"].params for o in p.opts}
    if {"--block-level", "--plan"} <= run_opts and {"--modes", "--plan"} <= prepare_opts:
        assert reason is None
    else:
        assert reason.startswith("unavailable: needs block-level scheduling")
    # with both commands' options present, it is available
    monkeypatch.setattr(launcher.run_command, "params", launcher.run_command.params
                        + [click.Option(["--block-level"], is_flag=True), click.Option(["--plan"])])
    prepare = bcli.blocksched_group.commands["prepare"]
    monkeypatch.setattr(prepare, "params", prepare.params + [click.Option(["--modes"]), click.Option(["--plan"])])
    assert systems.block_level_missing() is None


# ---------------------------------------------------------------- through the runner


def test_tally_block_runs_capture_prepare_then_block_level_with_reused_workers(tmp_path, fake_tally):
    command, calls = fake_tally
    out = tmp_path / "out"
    runner = make_runner(out, command)
    keys = [runner_mod.RunKey("fake-infer", "fake-train", system, 0.5) for system in ("tally", "tally-block")]
    tally, block = runner.run_matrix(keys)
    assert tally["status"] == "ok", tally.get("reason")
    assert block["status"] == "ok", block.get("reason")
    # the stored runs got the agent stats the BE worker wrote at its exit
    tally, block = (json.loads(runner.run_path(k).read_text()) for k in keys)
    assert block["blocksched"]["transformed_fraction"] == pytest.approx(0.75)
    assert block["blocksched"]["sliced_launches"] == 30 and block["blocksched"]["refused"] == {"no-ptx": 2}
    assert block["blocksched"]["scope"] == "worker" and block["blocksched"]["windows"] == 1
    assert block["agent_stats"]["be"]["kernel_launches"] == 40
    assert tally["agent_stats"]["be"]["kernel_launches"] == 40 and tally["blocksched"] is None
    assert "fake-train" in block["system"]["plans"]

    seq = calls()
    verbs = [" ".join(_opts(c)) for c in seq]
    block_calls = verbs[verbs.index("up", verbs.index("up") + 1):]  # tally's group first, then tally-block's
    capture = block_calls.index("run --priority best-effort --save-modules")
    prepare = next(i for i, v in enumerate(block_calls) if v.startswith("blocksched prepare"))
    measured = next(i for i, v in enumerate(block_calls) if v.startswith("run --priority best-effort --block-level"))
    assert 0 < capture < prepare < measured < block_calls.index("down")
    group = seq[len(verbs) - len(block_calls):]
    assert group[capture]["modules"] == str(Path(group[capture]["cache"]) / "modules")
    assert group[measured]["cache"] == group[capture]["cache"] and group[measured]["modules"] is None
    # the tally system's BE: launch level, with a stats dir, no capture or plan
    tally_calls = verbs[:verbs.index("down")]
    assert any(v.startswith("run --priority best-effort --stats-dir") for v in tally_calls)
    assert not any("--save-modules" in v or "--block-level" in v or "blocksched" in v for v in tally_calls)

    # the report: the BE sliced column, '-' where the agent had no block-level counters
    runs_out = tmp_path / "report"
    (runs_out / "runs").mkdir(parents=True)
    for k in keys:
        (runs_out / "runs" / f"{k.run_id}.json").write_text(runner.run_path(k).read_text())
    text = report.write_report(runs_out).read_text()
    rows = {line.split("|")[4].strip(): [c.strip() for c in line.split("|")]
            for line in text.splitlines() if line.startswith("| fake-infer |")}
    column = report.markdown_table([]).splitlines()[0].split("|").index(" BE sliced % (launches) ")
    assert rows["tally-block"][column] == "75.0 (30)" and rows["tally"][column] == "-"
    summary = {s["key"]["system"]: s for s in json.loads((runs_out / "summary.json").read_text())}
    assert summary["tally-block"]["blocksched"]["transformed_fraction"] == pytest.approx(0.75)


def test_tally_block_one_shot_run_and_a_failing_prepare(tmp_path, fake_tally, monkeypatch):
    command, calls = fake_tally
    runner = make_runner(tmp_path / "out", command, reuse_workers=False)
    ok = runner.run(runner_mod.RunKey("fake-infer", "fake-train", "tally-block", 0.5))
    assert ok["status"] == "ok", ok.get("reason")
    assert ok["blocksched"]["scope"] == "process" and ok["blocksched"]["transformed_fraction"] == pytest.approx(0.75)
    raw = tmp_path / "out" / "raw" / ok["run_id"] / "blocksched"
    assert (raw / "plan").is_file() and (raw / "capture.log").is_file() and (raw / "prepare.log").is_file()

    monkeypatch.setenv("FAKE_PREPARE_FAIL", "1")
    before = len(calls())
    failed = runner.run(runner_mod.RunKey("fake-infer", "fake-train", "tally-block", 0.25))
    assert failed["status"] == "failed"
    assert failed["reason"] == ("tally-block: `tally blocksched prepare` for fake-train failed (status 2): "
                                "tally: error: prepare exploded")
    verbs = [" ".join(_opts(c)) for c in calls()[before:]]
    assert verbs[0] == "up" and verbs[-1] == "down"  # the daemon is stopped after the failure
    assert not any("--block-level" in v for v in verbs)  # never silently launch-level, never a BE run
    row = [line for line in report.markdown_table([failed]).splitlines() if line.startswith("| fake-infer")][0]
    assert row.endswith("failed: tally-block: `tally blocksched prepare` for fake-train failed (status 2): "
                        "tally: error: prepare exploded |")

    # reused workers: the failure fails that BE workload's runs, with one prepare per group
    reused = make_runner(tmp_path / "reused", command)
    before = len(calls())
    results = reused.run_matrix([runner_mod.RunKey("fake-infer", "fake-train", "tally-block", load)
                                 for load in (0.5, 0.25)])
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all(r["reason"].endswith("tally: error: prepare exploded") for r in results)
    assert sum(1 for c in calls()[before:] if c["argv"][0] == "blocksched") == 1


def test_blocksched_summary_of_the_agents_stats():
    from tally.bench import metrics

    assert metrics.blocksched_summary(None) is None
    assert metrics.blocksched_summary({"kernel_launches": 3}) is None  # launch level: no counters
    stats = {"blocksched": {"plan": "/x/plan", "plan_kernels": 1, "sliced_launches": 7, "slices": 56,
                            "unsliced_launches": 1, "sliced_est_ns": 7_000, "unsliced_est_ns": 0, "not_in_plan": 4,
                            "unusable": 0, "kernels": [{"entry": "work", "sliced_launches": 7, "usable": True}]}}
    out = metrics.blocksched_summary(stats)
    assert out["transformed_fraction"] == 1.0 and out["sliced_launches"] == 7 and out["not_in_plan"] == 4
    assert out["plan"] == "/x/plan" and out["refused"] == {} and out["kernels"][0]["entry"] == "work"
    idle = metrics.blocksched_summary({"blocksched": {"plan_kernels": 1}})
    assert idle["transformed_fraction"] is None and idle["sliced_launches"] == 0
    fields = runner_mod.agent_fields(stats, "worker", 3)
    assert fields["blocksched"]["windows"] == 3 and fields["agent_stats"]["be"] is stats
    assert runner_mod.agent_fields(None, "process") == {"agent_stats": None, "blocksched": None}
