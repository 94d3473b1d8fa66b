"""Workload references, the worker process (open-loop HP, BE, signals), user entry points and commands."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tally.bench import traces
from tally.bench import workloads as registry
from tally.errors import TallyError

PYTHON = sys.executable


def test_parse_ref_variants_roles_and_errors():
    ref = registry.parse_ref("llama-decode")
    assert ref.variant == "graph" and ref.text == "llama-decode"
    assert registry.parse_ref("llama-decode@eager").text == "llama-decode@eager"
    # torch.compile with Triton GEMM/conv templates only: training workloads, for block-level scheduling
    assert registry.parse_ref("gpt2-train@compile-triton").variant == "compile-triton"
    with pytest.raises(TallyError, match="no variant 'compile-triton'"):
        registry.parse_ref("bert-infer@compile-triton")
    with pytest.raises(TallyError, match="no variant 'graph'"):
        registry.parse_ref("resnet50-train@graph")
    with pytest.raises(TallyError, match="unknown workload 'nope'"):
        registry.parse_ref("nope")
    with pytest.raises(TallyError, match="role hp needs infer"):
        registry.parse_ref("gpt2-train", role="hp")
    assert registry.parse_ref("mypkg.mod:make", role="hp").entry_point == "mypkg.mod:make"
    with pytest.raises(TallyError, match="needs a command line"):
        registry.parse_ref("command", role="be")


def test_every_registered_workload_documents_batch_precision_and_an_importable_factory_module():
    for name, spec in registry.REGISTRY.items():
        assert spec.kind in (registry.TRAIN, registry.INFER), name
        assert spec.batch_size >= 1 and spec.precision and spec.variants, name
        module, attr = spec.factory.split(":")
        assert module.startswith("tally.bench."), name
    assert len(registry.real_workloads(registry.TRAIN)) == 6
    assert len(registry.real_workloads(registry.INFER)) == 5


class _Echo:
    def __init__(self, role, options):
        self.role, self.options, self.steps = role, options, 0

    def step(self):
        self.steps += 1


def make_echo(role, options):
    return _Echo(role, options)


def make_nothing(role, options):
    return object()


def test_entry_point_workloads_are_built_and_checked():
    ref = registry.parse_ref(f"{__name__}:make_echo")
    workload = registry.build(ref, "hp", {"x": 1})
    workload.step()
    assert workload.role == "hp" and workload.options == {"x": 1} and workload.steps == 1
    with pytest.raises(TallyError, match="has no step"):
        registry.build(registry.parse_ref(f"{__name__}:make_nothing"), "hp", {})
    with pytest.raises(TallyError, match="cannot import"):
        registry.build(registry.parse_ref("no_such_module_xyz:f"), "hp", {})


def test_parse_options_converts_numbers():
    assert registry.parse_options(["batch=2", "ratio=0.5", "mode=fast"]) == {"batch": 2, "ratio": 0.5, "mode": "fast"}
    with pytest.raises(TallyError, match="not KEY=VALUE"):
        registry.parse_options(["batch"])


def _worker(args, **kwargs):
    return subprocess.Popen([PYTHON, "-m", "tally.bench.worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _arrivals(path: Path, offsets, duration=1.0) -> Path:
    traces.Arrivals(offsets_s=offsets, duration_s=duration, load=0.5, service_time_s=0.01, source="test").write(path)
    return path


def test_hp_worker_is_open_loop_and_queues_fifo(tmp_path):
    # 3 requests at once + 1 later: the 2nd and 3rd wait for the ones before them
    arrivals = _arrivals(tmp_path / "a.json", [0.05, 0.05, 0.05, 0.5])
    proc = _worker(["--workload", "fake-infer", "--role", "hp", "--arrivals", str(arrivals), "--result",
                    str(tmp_path / "r.json"), "--warmup-steps", "1", "--warmup-s", "0", "--option", "service_ms=40"])
    assert proc.wait(timeout=30) == 0, proc.stdout.read()
    result = json.loads((tmp_path / "r.json").read_text())
    reqs = result["requests"]
    assert len(reqs) == 4 and result["offered"] == 4
    for (due, start, end) in reqs:
        assert due - 1e-3 <= start < end
    assert reqs[1][1] >= reqs[0][2] - 1e-6 and reqs[2][1] >= reqs[1][2] - 1e-6  # FIFO, one at a time
    assert reqs[2][2] - reqs[2][0] > 0.11  # queued behind two 40 ms requests
    assert reqs[3][1] - reqs[3][0] < 0.01  # idle server: served on arrival
    assert result["warmup"]["steps"] >= 1


def test_be_worker_writes_steps_on_sigterm_and_exits_cleanly(tmp_path):
    ready = tmp_path / "ready"
    proc = _worker(["--workload", "fake-train", "--role", "be", "--result", str(tmp_path / "r.json"),
                    "--ready-file", str(ready), "--warmup-steps", "1", "--warmup-s", "0", "--option", "step_ms=10"])
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["interrupted"] and result["stopped_by"] == "SIGTERM"
    steps = result["step_end_times"]
    assert len(steps) >= 10 and steps == sorted(steps) and steps[0] > result["measure_start_time"]
    assert json.loads(ready.read_text())["pid"] == proc.pid


def test_capacity_mode_reports_service_time(tmp_path):
    proc = _worker(["--workload", "fake-infer", "--role", "hp", "--measure-capacity", "--capacity-s", "0.3",
                    "--result", str(tmp_path / "c.json"), "--warmup-steps", "1", "--warmup-s", "0",
                    "--option", "service_ms=10"])
    assert proc.wait(timeout=30) == 0
    capacity = json.loads((tmp_path / "c.json").read_text())["capacity"]
    assert 0.0095 < capacity["service_time_s"] < 0.02
    assert capacity["throughput_rps"] == pytest.approx(1 / capacity["service_time_s"], rel=0.1)


def test_worker_failure_leaves_a_result_with_the_error(tmp_path):
    proc = _worker(["--workload", "fake-infer", "--role", "hp", "--measure-capacity", "--result",
                    str(tmp_path / "c.json"), "--option", "service_ms=abc"])
    assert proc.wait(timeout=30) == 1
    result = json.loads((tmp_path / "c.json").read_text())
    assert "ValueError" in result["error"]


HP_PROGRAM = "import sys\nfor line in sys.stdin:\n    print('done', flush=True)\n"
BE_PROGRAM = "import time\nwhile True:\n    time.sleep(0.01)\n    print('step', flush=True)\n"


def test_command_workloads_speak_the_line_protocol(tmp_path):
    arrivals = _arrivals(tmp_path / "a.json", [0.0, 0.01, 0.02])
    hp = _worker(["--workload", "command", "--role", "hp", "--command", f"{PYTHON} -c \"{HP_PROGRAM}\"",
                  "--arrivals", str(arrivals), "--result", str(tmp_path / "hp.json"), "--warmup-steps", "2",
                  "--warmup-s", "0"])
    assert hp.wait(timeout=30) == 0, hp.stdout.read()
    assert len(json.loads((tmp_path / "hp.json").read_text())["requests"]) == 3
    be = _worker(["--workload", "command", "--role", "be", "--command", f"{PYTHON} -c \"{BE_PROGRAM}\"",
                  "--duration", "0.5", "--result", str(tmp_path / "be.json"), "--warmup-steps", "2", "--warmup-s", "0"])
    assert be.wait(timeout=30) == 0, be.stdout.read()
    assert len(json.loads((tmp_path / "be.json").read_text())["step_end_times"]) >= 10


def test_self_check_prints_pass_lines_for_fakes():
    out = subprocess.run([PYTHON, "-m", "tally.bench.worker", "--self-check", "--workload", "fake-train", "--role", "be"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.startswith("PASS fake-train@sleep") and "1 passed, 0 failed" in out.stdout
