"""The CPU-side parts of benchmarks/ptx_gpu_check.py (the GPU parts run on the H100)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings, strategies as st

from conftest import MANIFEST

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ptx_gpu_check.py"
spec = importlib.util.spec_from_file_location("ptx_gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_dry_run_prepares_every_module_and_plans_the_launchable_kernels(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--seed", "1"]) == 0
    plan = json.loads((tmp_path / "ptx_gpu_check_plan.json").read_text())
    launchable = [k for k in MANIFEST["kernels"] if k["grid"] is not None]
    assert len(plan["to_check"]) == len(launchable)
    workdir = Path(plan["workdir"])
    assert len(list(workdir.glob("*.ptx"))) == 3 * len({k["module"] for k in MANIFEST["kernels"]})
    for kernel in launchable:
        # every launch description matches the PTX parameter count
        from tally.ptx.parse import read_module
        module = read_module(Path(gpu_check.CORPUS) / kernel["module"])
        assert len(module.entry(kernel["entry"]).params) == len(kernel["params"]), kernel["entry"]
        for param in kernel["params"]:
            assert param["kind"] in ("input", "inout", "output", "zeros", "scalar", "null")
            if "dtype" in param:
                assert param["dtype"] in gpu_check.NUMPY_DTYPES or param["dtype"] in gpu_check.SCALAR_DTYPES


@settings(deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2**32 - 1))
def test_random_slice_sizes_cover_the_grid(total, seed):
    sizes = gpu_check.random_slice_sizes(np.random.default_rng(seed), total)
    assert all(size >= 1 for size in sizes)
    assert sum(sizes) >= total and sum(sizes[:-1]) < total


def test_report_tables():
    records = [{"kernel": "m:k", "modes": ["slice", "preemptible"],
                "checks": [{"check": "a", "identical": True}, {"check": "b", "identical": False}],
                "failures": ["b differs"],
                "throughput": {"original_ms": 1.0, "slice:4": {"ms": 2.0, "ratio": 0.5}},
                "preemption_latency": [{"workers": 132, "p50_ms": 0.02, "p99_ms": 0.05, "samples": 9},
                                       {"workers": 264, "p50_ms": 0.03, "p99_ms": 0.04, "samples": 9}]}]
    rows = gpu_check.summarize(records)
    assert rows[0]["identical"] == "1/2"
    assert rows[0]["preempt_p99_ms"] == 0.04 and rows[0]["preempt_workers"] == 264
    text = gpu_check.markdown({"gpu": "H100"}, rows, {"kernels": 1, "checks": 2, "identical": 1, "failures": 1})
    assert "| m:k | slice,preemptible | 1/2 | 1.0000 | slice:4=0.5 | 0.0300 | 0.0400 (264) | 1 |" in text


def test_per_transformation_summary_and_report():
    records = [{"kernel": "m:a", "modes": ["slice", "ptb", "preemptible"], "checks": [], "failures": [],
                "throughput": {"original_ms": 1.0, "slice:4": {"ms": 2.0, "ratio": 0.5},
                               "ptb:132": {"ms": 4.0, "ratio": 0.25}, "ptb:528": {"ms": 2.0, "ratio": 0.5},
                               "preemptible:132": {"ms": 1.0, "ratio": 1.0}},
                "preemption_latency": [{"workers": 132, "p50_ms": 0.01, "p99_ms": 0.02, "samples": 9}]},
               {"kernel": "m:b", "modes": ["ptb"], "checks": [], "failures": [],
                "throughput": {"original_ms": 1.0, "ptb:132": {"ms": 0.5, "ratio": 2.0}}}]
    modes = gpu_check.per_transformation(records)
    assert modes["ptb"]["kernels"] == 2 and abs(modes["ptb"]["best_ratio_geomean"] - 1.0) < 1e-9
    assert modes["slice"]["best_ratio_max"] == 0.5
    assert modes["preemptible"]["latency_p99_ms_max"] == 0.02
    text = gpu_check.markdown({"gpu": "H100"}, gpu_check.summarize(records), {"kernels": 2, "checks": 0, "identical": 0,
                                                                              "failures": 0}, modes)
    assert "| ptb | 2 | 1.000 | 0.500 | 2.000 | - | - |" in text
    assert "| preemptible | 1 | 1.000 | 1.000 | 1.000 | 0.0100 | 0.0200 |" in text


# ------------------------------------------------------------------ the timing logic, on a fake cupy
class FakeMemory:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeArray:
    addresses = [0x10000]

    def __init__(self, array, ptr=None):
        self.array = array
        if ptr is None:
            ptr = FakeArray.addresses[0]
            FakeArray.addresses[0] += 1 << 20
        self.data = FakeMemory(ptr)
        self.nbytes = array.nbytes

    def __getitem__(self, index):
        return FakeArray(self.array[index], self.data.ptr + index * self.array.strides[0])


class FakeCupy:
    def __init__(self, log):
        log_ = log

        class Event:
            def record(self, stream):
                log_.append(("event", self))

            def synchronize(self):
                pass

        class Runtime:
            @staticmethod
            def memsetAsync(ptr, value, size, stream):
                log_.append(("memset", ptr, size))

        class Driver:
            @staticmethod
            def occupancyMaxActiveBlocksPerMultiprocessor(func, block, shared):
                return 3

        class Cuda:
            pass

        Cuda.Event, Cuda.runtime, Cuda.driver = Event, Runtime, Driver
        Cuda.get_elapsed_time = staticmethod(lambda start, end: 10.0)
        self.cuda, self.uint32, self.log = Cuda, np.uint32, log
        self.rows = {}  # device address -> the numpy row (one State) there

    def zeros(self, shape, dtype):
        array = FakeArray(np.zeros(shape, dtype=dtype))
        for index in range(array.array.shape[0] if array.array.ndim == 2 else 1):
            row = array[index] if array.array.ndim == 2 else array
            self.rows[row.data.ptr] = row.array
        self.log.append(("zeros", array.data.ptr, array.nbytes))
        return array

    def asnumpy(self, array):
        return array.array


class FakeStream:
    ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


KERNEL = {"module": "m.ptx", "entry": "k", "grid": [10, 3, 1], "block": [128, 1, 1], "shared": 0, "params": [],
          "modes": ["slice", "ptb", "preemptible"]}
PLAN = {"modules": {"m.ptx": {"original": "o", "slice": "s", "ptb": "p", "preemptible": "q"}}}


def fake_gpu(log):
    cp = FakeCupy(log)
    gpu = type("G", (), {})()
    gpu.cp, gpu.sms, gpu.stream, gpu.preempt_stream = cp, 4, FakeStream(), FakeStream()
    gpu.function = lambda path, name, shared: type("F", (), {"ptr": 1})()
    gpu.set_retreat = lambda state: log.append(("retreat", state.data.ptr))
    gpu.clear_retreat = lambda state: log.append(("clear", state.data.ptr))
    return gpu


def fake_launch(log, cp, total):
    def launch(self, mode, args, grid=None, extra=()):
        log.append(("launch", mode, grid, extra))
        if mode in ("ptb", "preemptible"):  # the kernel finishes the grid: next_index = total
            cp.rows[int(extra[-1])][0] = total
    return launch


def test_check_kernel_runs_every_step_on_a_fake_gpu(monkeypatch):
    """The whole per-kernel GPU procedure, with launches that do nothing: catches
    Python-level mistakes (signatures, State sizes) before they cost GPU time."""
    log = []
    gpu = fake_gpu(log)
    monkeypatch.setattr(gpu_check.KernelRun, "fresh_buffers", lambda self: ([], []))
    monkeypatch.setattr(gpu_check.KernelRun, "launch", fake_launch(log, gpu.cp, 30))
    record = gpu_check.check_kernel(gpu, PLAN, KERNEL, np.random.default_rng(0), quick=True)
    assert record["failures"] == [], record.get("tracebacks")
    assert all(check["identical"] for check in record["checks"]) and record["checks"]
    assert {k.split(":")[0] for k in record["throughput"] if k != "original_ms"} == {"slice", "ptb", "preemptible"}
    assert record["resident_workers"] == {"ptb": 12, "preemptible": 12}
    assert record["preemption_latency"]


def test_throughput_timing_excludes_state_setup_and_gives_each_launch_its_own_state():
    log = []
    gpu = fake_gpu(log)
    cp = gpu.cp
    run = gpu_check.KernelRun(gpu, PLAN, KERNEL, np.random.default_rng(0))
    run.fresh_buffers = lambda: ([], [])
    run.launch = fake_launch(log, cp, run.total).__get__(run)
    assert run.resident_workers("ptb") == 12
    reps = 5
    results = run.throughput(reps, [("ptb", 4), ("preemptible", 12), ("slice", 7)])
    assert set(results) == {"original_ms", "ptb:4", "preemptible:12", "slice:7"}
    events = [i for i, entry in enumerate(log) if entry[0] == "event"]
    assert len(events) == 8  # start/end for the original and each configuration
    for start, end in zip(events[::2], events[1::2]):
        timed = log[start + 1 : end]
        assert timed and all(entry[0] == "launch" for entry in timed), timed  # nothing but launches is timed
        modes = {entry[1] for entry in timed}
        if modes & {"ptb", "preemptible"}:
            states = [int(entry[3][-1]) for entry in timed]
            assert len(timed) == reps and len(set(states)) == reps  # one fresh State per timed launch
            workers = timed[0][2][0]
            assert all(entry[2] == (workers, 1, 1) for entry in timed)
        if modes == {"slice"}:
            assert len(timed) == reps * len(gpu_check.abi.slice_plan(run.grid, 7))
    # the States were sized for the worker count
    sizes = {entry[2] for entry in log if entry[0] == "zeros"}
    assert gpu_check.abi.state_size(4) * (reps + run.WARMUP) in sizes
    assert gpu_check.abi.state_size(12) * (reps + run.WARMUP) in sizes
