#!/usr/bin/env python3
"""GPU evidence for tally.ptx: bit-exactness, throughput and preemption latency.

    python benchmarks/ptx_gpu_check.py [--out benchmarks/results] [--quick] [--dry-run]

For every launchable kernel of tests/ptx/corpus/manifest.json and every
transformation that accepts it, on fresh random inputs (outputs poisoned first):
  * slice: random slice sizes, slices launched in order;
  * ptb: several worker counts;
  * preemptible: the retreat flag is set from a second non-blocking stream at a
    random moment while the kernel runs, then the launch is resumed (flag
    cleared, same state) until the grid is done; repeated many times;
and compares all written buffers with the original launch bit for bit. It also
times each mode against the original (throughput ratio) and measures the
preemption latency (flag written -> kernel finished, CUDA events), p50/p99.

Throughput ratio = original ms / transformed ms for the same grid of original
blocks on the same buffers (> 1: the transformation is faster). Both sides get
2 untimed warm-up launches, then `reps` launches back to back between two CUDA
events on one stream; launch overhead is included on both sides (a slice plan
of n launches pays it n times). PTB/preemptible launches each use their own
State, all allocated and zeroed before the timed region, so no allocation or
memset is timed. Worker counts: `sms`, `4*sms` and, when the occupancy query
works, the number of workers that fit on the GPU at once (`resident_workers`).
The summary reports, per transformation, the ratio of each configuration and
the geometric mean over kernels, and the preemption latency per kernel.

Writes ptx_gpu_check.json and ptx_gpu_check.md into --out and prints a short
table last. --dry-run does only the CPU-side preparation (parse, transform,
plan) and needs no GPU. Per-kernel failures are recorded, never fatal.
Needs: numpy, cupy (cupy-cuda13x); torch is only asked for its version.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tally.ptx import abi  # noqa: E402
from tally.ptx.analysis import MODES, refusal  # noqa: E402
from tally.ptx.parse import read_module  # noqa: E402
from tally.ptx.transform import transform_module  # noqa: E402

CORPUS = ROOT / "tests" / "ptx" / "corpus"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint32": np.uint32,
                "int8as32": np.int32}
SCALAR_DTYPES = {"float32": np.float32, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64}
POISON = 0xFF


# ----------------------------------------------------------------------------- CPU side
def prepare(workdir: Path) -> dict:
    """Transform every corpus module in every mode; write them to `workdir`;
    return the plan: module files per mode and the kernels to check."""
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    modules: dict[str, dict[str, str]] = {}
    kernels = []
    for kernel in manifest["kernels"]:
        source = CORPUS / kernel["module"]
        if kernel["module"] not in modules:
            module = read_module(source)
            files = {"original": str(source)}
            for mode in MODES:
                result = transform_module(module, mode)
                target = workdir / f"{source.stem}.{mode}.ptx"
                target.write_text(result.text)
                files[mode] = str(target)
            modules[kernel["module"]] = files
        module = read_module(source)
        entry = module.entry(kernel["entry"])
        accepted = [mode for mode in MODES if refusal(module, entry, mode) is None]
        kernels.append({**kernel, "modes": accepted, "launchable": kernel["grid"] is not None})
    return {"modules": modules, "kernels": kernels}


def percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def random_slice_sizes(rng, total: int) -> list[int]:
    sizes, covered = [], 0
    while covered < total:
        size = int(rng.integers(1, max(2, total // int(rng.integers(1, 9)) + 2)))
        sizes.append(size)
        covered += size
    return sizes


# ----------------------------------------------------------------------------- GPU side
class Gpu:
    def __init__(self):
        import cupy

        self.cp = cupy
        self.device = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(self.device.id)
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.sms = int(props["multiProcessorCount"])
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.preempt_stream = cupy.cuda.Stream(non_blocking=True)
        self.flag_host = cupy.cuda.alloc_pinned_memory(4)
        np.frombuffer(self.flag_host, dtype=np.uint32, count=1)[:] = 1
        self.modules: dict[str, object] = {}
        self.functions: dict[tuple[str, str], object] = {}

    def function(self, path: str, name: str, shared: int):
        """`shared`: the launch's dynamic shared memory (transformed entries add no shared memory)."""
        if (path, name) in self.functions:
            return self.functions[(path, name)]
        if path not in self.modules:
            self.modules[path] = self.cp.RawModule(path=path)
        function = self.modules[path].get_function(name)
        if shared > 48 * 1024:
            function.max_dynamic_shared_size_bytes = shared
        self.functions[(path, name)] = function
        return function

    def set_retreat(self, state) -> None:
        """Write retreat = 1 from the second stream (copy engine): the kernel keeps running meanwhile."""
        self.cp.cuda.runtime.memcpyAsync(state.data.ptr + abi.RETREAT_OFFSET, self.flag_host.ptr, 4, 1,
                                         self.preempt_stream.ptr)

    def clear_retreat(self, state) -> None:
        self.cp.cuda.runtime.memsetAsync(state.data.ptr + abi.RETREAT_OFFSET, 0, 4, self.stream.ptr)


class KernelRun:
    """Buffers and launches of one corpus kernel."""

    def __init__(self, gpu: Gpu, plan: dict, kernel: dict, rng):
        self.gpu, self.kernel, self.cp = gpu, kernel, gpu.cp
        self.grid = tuple(kernel["grid"])
        self.block = tuple(kernel["block"])
        self.shared = int(kernel["shared"])
        self.total = abi.total_blocks(self.grid)
        self.files = plan["modules"][kernel["module"]]
        self.inputs = {}
        for index, param in enumerate(kernel["params"]):
            if param["kind"] in ("input", "inout"):
                self.inputs[index] = self._random(param, rng)

    def _random(self, param, rng):
        dtype, count = param["dtype"], param["count"]
        if dtype == "int8as32":
            return rng.integers(-128, 128, size=count, dtype=np.int32)
        if dtype in ("int32", "uint32"):
            return rng.integers(0, 1 << 20, size=count).astype(NUMPY_DTYPES[dtype])
        return rng.standard_normal(count).astype(NUMPY_DTYPES[dtype])

    def fresh_buffers(self):
        """Device buffers for one logical run; returns (args, buffers to compare)."""
        cp = self.cp
        args, compared = [], []
        with self.gpu.stream:
            for index, param in enumerate(self.kernel["params"]):
                kind = param["kind"]
                if kind in ("input", "inout"):
                    array = cp.asarray(self.inputs[index])
                    args.append(array)
                    if kind == "inout":
                        compared.append(array)
                elif kind == "output":
                    array = cp.empty(param["count"], dtype=NUMPY_DTYPES[param["dtype"]])
                    array.view(cp.uint8).fill(POISON)
                    args.append(array)
                    compared.append(array)
                elif kind == "zeros":
                    array = cp.zeros(param["count"], dtype=NUMPY_DTYPES[param["dtype"]])
                    args.append(array)
                    compared.append(array)
                elif kind == "scalar":
                    args.append(SCALAR_DTYPES[param["dtype"]](param["value"]))
                elif kind == "null":
                    args.append(np.uint64(0))
                else:
                    raise ValueError(f"unknown parameter kind {kind}")
        self.gpu.stream.synchronize()
        return args, compared

    def function(self, mode):
        name = self.kernel["entry"] if mode == "original" else abi.transformed_name(self.kernel["entry"], mode)
        return self.gpu.function(self.files[mode], name, self.shared)

    def launch(self, mode, args, grid=None, extra=()):
        function = self.function(mode)
        function(grid or self.grid, self.block, tuple(args) + tuple(extra), shared_mem=self.shared,
                 stream=self.gpu.stream)

    @staticmethod
    def typed(extra):
        return tuple(np.uint32(v) if t == "u32" else np.uint64(v) for t, v in extra)

    def new_state(self, workers, count=None):
        """A zeroed State for launches of up to `workers` workers (abi.state_size), or
        `count` of them, contiguous (count x words array)."""
        words = abi.state_size(workers) // 4
        with self.gpu.stream:  # zeroed on the launch stream (non-blocking: no implicit sync with stream 0)
            state = self.cp.zeros(words if count is None else (count, words), dtype=self.cp.uint32)
        self.gpu.stream.synchronize()
        return state

    def resident_workers(self, mode):
        """Workers that are all resident at once (occupancy x SMs), or None if the query fails."""
        try:
            function = self.function(mode)
            per_sm = self.cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                function.ptr, int(np.prod(self.block)), self.shared)
            return abi.worker_count(self.gpu.sms, max(1, int(per_sm)), self.grid)
        except Exception:
            return None

    def read_state(self, state):
        self.gpu.stream.synchronize()
        return abi.read_state(self.cp.asnumpy(state).tobytes())

    def snapshot(self, compared):
        self.gpu.stream.synchronize()
        return [self.cp.asnumpy(array).tobytes() for array in compared]

    # -- the modes ---------------------------------------------------------------
    def run_original(self):
        args, compared = self.fresh_buffers()
        self.launch("original", args)
        return self.snapshot(compared)

    def run_slices(self, sizes):
        args, compared = self.fresh_buffers()
        for launch in abi.slice_plan_sizes(self.grid, sizes):
            self.launch("slice", args, launch.grid, self.typed(launch.appended_args(self.grid)))
        return self.snapshot(compared)

    def run_ptb(self, mode, workers):
        args, compared = self.fresh_buffers()
        grid = abi.ptb_grid(self.grid, workers)
        state = self.new_state(grid[0])
        self.launch(mode, args, grid, self.typed(abi.ptb_args(self.grid, state.data.ptr)))
        final = self.read_state(state)
        if not final.finished(self.grid):
            raise RuntimeError(f"{mode} with {workers} workers stopped at block {final.next_index} of {self.total}")
        return self.snapshot(compared)

    def run_preempted(self, workers, rng, max_delay_s):
        """Preempt at random moments and resume until done; returns (outputs, preemptions that interrupted)."""
        args, compared = self.fresh_buffers()
        grid = abi.ptb_grid(self.grid, workers)
        state = self.new_state(grid[0])
        extra = self.typed(abi.ptb_args(self.grid, state.data.ptr))
        interrupted, launches = 0, 0
        while True:
            launches += 1
            self.launch("preemptible", args, grid, extra)
            if launches < 50:  # always finish eventually: stop preempting after 50 launches
                deadline = time.perf_counter() + float(rng.uniform(0, max_delay_s))
                while time.perf_counter() < deadline:
                    pass
                self.gpu.set_retreat(state)
                self.gpu.preempt_stream.synchronize()
            current = self.read_state(state)
            if current.finished(self.grid):
                break
            interrupted += 1
            self.gpu.clear_retreat(state)
        return self.snapshot(compared), interrupted, launches

    # -- timing ------------------------------------------------------------------
    WARMUP = 2

    def time_ms(self, launch_once, reps):
        """Mean ms of launch_once(i) over i = WARMUP .. WARMUP+reps-1, after untimed warm-up
        launches i = 0 .. WARMUP-1 (and a synchronize, so nothing untimed overlaps the timing)."""
        cp = self.cp
        for i in range(self.WARMUP):
            launch_once(i)
        self.gpu.stream.synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(self.gpu.stream)
        for i in range(self.WARMUP, self.WARMUP + reps):
            launch_once(i)
        end.record(self.gpu.stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / reps

    def throughput(self, reps, configs):
        args, _ = self.fresh_buffers()
        results = {"original_ms": self.time_ms(lambda i: self.launch("original", args), reps)}

        def ptb_once(mode, workers):
            grid = abi.ptb_grid(self.grid, workers)
            # one zeroed State per launch, allocated and zeroed before the timing starts
            states = self.new_state(grid[0], count=self.WARMUP + reps)
            extras = [self.typed(abi.ptb_args(self.grid, states[i].data.ptr)) for i in range(self.WARMUP + reps)]

            def once(i):
                self.launch(mode, args, grid, extras[i])
            return once, states

        def slice_once(size):
            plan = abi.slice_plan(self.grid, size)
            extras = [(launch.grid, self.typed(launch.appended_args(self.grid))) for launch in plan]

            def once(i):
                for grid, extra in extras:
                    self.launch("slice", args, grid, extra)
            return once, None

        for mode, value in configs:
            key = f"{mode}:{value}"
            once, states = slice_once(value) if mode == "slice" else ptb_once(mode, value)
            milliseconds = self.time_ms(once, reps)
            results[key] = {"ms": milliseconds, "ratio": results["original_ms"] / milliseconds}
            if states is not None:
                unfinished = [i for i, row in enumerate(self.cp.asnumpy(states))
                              if not abi.read_state(row.tobytes()).finished(self.grid)]
                if unfinished:
                    raise RuntimeError(f"{key}: timed launches {unfinished[:5]} did not finish the grid")
        return results

    def preemption_latency(self, workers, samples, rng, kernel_ms):
        """Flag written (event after the copy on the preempt stream) -> kernel finished (event after it)."""
        cp = self.cp
        args, _ = self.fresh_buffers()
        state = self.new_state(abi.ptb_grid(self.grid, workers)[0])
        latencies, finished_first = [], 0
        for _ in range(samples):
            cp.cuda.runtime.memsetAsync(state.data.ptr, 0, state.nbytes, self.gpu.stream.ptr)
            self.gpu.stream.synchronize()
            self.launch("preemptible", args, abi.ptb_grid(self.grid, workers),
                        self.typed(abi.ptb_args(self.grid, state.data.ptr)))
            kernel_end = cp.cuda.Event()
            kernel_end.record(self.gpu.stream)
            deadline = time.perf_counter() + float(rng.uniform(0.1, 0.6)) * kernel_ms / 1000.0
            while time.perf_counter() < deadline:
                pass
            self.gpu.set_retreat(state)
            flag_written = cp.cuda.Event()
            flag_written.record(self.gpu.preempt_stream)
            kernel_end.synchronize()
            flag_written.synchronize()
            final = self.read_state(state)
            if final.finished(self.grid) or final.next_index == 0:
                # the grid completed before the flag landed, or the flag landed before any
                # worker started: neither measures preempting a running kernel
                finished_first += 1
                continue
            latencies.append(max(0.0, cp.cuda.get_elapsed_time(flag_written, kernel_end)))
        return {"workers": workers, "samples": len(latencies), "finished_before_flag": finished_first,
                "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                "max_ms": max(latencies) if latencies else None}


def check_kernel(gpu: Gpu, plan: dict, kernel: dict, rng, quick: bool) -> dict:
    record = {"kernel": f"{kernel['module']}:{kernel['entry']}", "modes": kernel["modes"], "checks": [],
              "failures": []}
    run = KernelRun(gpu, plan, kernel, rng)
    reference = run.run_original()
    again = run.run_original()
    if again != reference:
        record["failures"].append("original launch is not deterministic: bit-exact comparison impossible")
        return record

    def compare(label, outputs):
        ok = outputs == reference
        record["checks"].append({"check": label, "identical": ok})
        if not ok:
            record["failures"].append(f"{label}: outputs differ from the original launch")

    sms, total = gpu.sms, run.total
    worker_counts = sorted({1, max(1, sms // 2), sms, 2 * sms, 4 * sms, int(rng.integers(1, 8 * sms))})
    worker_counts = sorted({min(w, total) for w in worker_counts})
    slice_trials = 3 if quick else 8
    preempt_trials = 6 if quick else 25
    for mode in kernel["modes"]:
        try:
            if mode == "slice":
                for _ in range(slice_trials):
                    sizes = random_slice_sizes(rng, total)
                    compare(f"slice sizes {sizes[:4]}{'...' if len(sizes) > 4 else ''} ({len(sizes)} slices)",
                            run.run_slices(sizes))
                compare("slice size 1 block", run.run_slices([1] * total)) if total <= 2048 else None
            else:
                for workers in worker_counts:
                    compare(f"{mode} workers={workers}", run.run_ptb(mode, workers))
            if mode == "preemptible":
                timing_args, _ = run.fresh_buffers()
                original_ms = run.time_ms(lambda i: run.launch("original", timing_args), 3)
                interrupted_total = 0
                for trial in range(preempt_trials):
                    workers = int(rng.choice(worker_counts))
                    outputs, interrupted, launches = run.run_preempted(workers, rng, max(20e-6, 1.2 * original_ms / 1e3))
                    interrupted_total += interrupted
                    compare(f"preempted run {trial} workers={workers} ({interrupted} preemptions, {launches} launches)",
                            outputs)
                record["preemptions_that_interrupted"] = interrupted_total
        except Exception as exc:  # recorded, not fatal: the other kernels still run
            record["failures"].append(f"{mode}: {type(exc).__name__}: {exc}")
            record.setdefault("tracebacks", []).append(traceback.format_exc())
    try:
        configs = []
        for mode in kernel["modes"]:
            if mode == "slice":
                configs += [("slice", max(1, total // 4)), ("slice", min(total, 2 * sms))]
            else:
                resident = run.resident_workers(mode)
                if resident is not None:
                    record.setdefault("resident_workers", {})[mode] = resident
                counts = sorted({min(total, sms), min(total, 4 * sms)} | ({resident} if resident else set()))
                configs += [(mode, workers) for workers in counts]
        record["throughput"] = run.throughput(5 if quick else 20, configs)
        if "preemptible" in kernel["modes"]:
            kernel_ms = record["throughput"]["original_ms"]
            record["preemption_latency"] = [
                run.preemption_latency(min(total, w), 10 if quick else 40, rng, kernel_ms)
                for w in sorted({min(total, sms), min(total, 2 * sms), min(total, 4 * sms)})
            ]
    except Exception as exc:
        record["failures"].append(f"timing: {type(exc).__name__}: {exc}")
        record.setdefault("tracebacks", []).append(traceback.format_exc())
    return record


# ----------------------------------------------------------------------------- reporting
def environment(gpu) -> dict:
    from tally.bench.runner import collect_environment  # date, host, GPU, driver: as every benchmark records them

    info = collect_environment()
    info.setdefault("driver", "unknown")
    if gpu is not None:
        import cupy

        info.update(gpu=gpu.name, sms=gpu.sms, cupy=cupy.__version__,
                    cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(), cuda_driver_api=cupy.cuda.runtime.driverGetVersion())
    try:
        import torch

        info["torch"] = torch.__version__
    except Exception:
        info["torch"] = "not installed"
    return info


def summarize(records) -> list[dict]:
    rows = []
    for record in records:
        throughput = record.get("throughput", {})
        best_latency = None
        for latency in record.get("preemption_latency", []):
            if latency["p99_ms"] is not None and (best_latency is None or latency["p99_ms"] < best_latency["p99_ms"]):
                best_latency = latency
        checks = record["checks"]
        rows.append({
            "kernel": record["kernel"],
            "modes": ",".join(record["modes"]) or "-",
            "identical": f"{sum(c['identical'] for c in checks)}/{len(checks)}",
            "original_ms": throughput.get("original_ms"),
            "ratios": {k: round(v["ratio"], 3) for k, v in throughput.items() if isinstance(v, dict)},
            "preempt_p50_ms": best_latency and best_latency["p50_ms"],
            "preempt_p99_ms": best_latency and best_latency["p99_ms"],
            "preempt_workers": best_latency and best_latency["workers"],
            "failures": len(record["failures"]),
        })
    return rows


def per_transformation(records) -> dict:
    """Per mode: geometric mean / min / max over kernels of the best throughput ratio among the
    mode's timed configurations, and (preemptible) the preemption latency over kernels."""
    modes = {}
    for mode in MODES:
        best = []
        for record in records:
            ratios = [v["ratio"] for k, v in record.get("throughput", {}).items()
                      if isinstance(v, dict) and k.split(":")[0] == mode and v.get("ratio")]
            if ratios:
                best.append(max(ratios))
        if not best:
            continue
        entry = {"kernels": len(best), "best_ratio_geomean": float(np.exp(np.mean(np.log(best)))),
                 "best_ratio_min": min(best), "best_ratio_max": max(best)}
        if mode == "preemptible":
            p50 = [lat["p50_ms"] for r in records for lat in r.get("preemption_latency", []) if lat["p50_ms"] is not None]
            p99 = [lat["p99_ms"] for r in records for lat in r.get("preemption_latency", []) if lat["p99_ms"] is not None]
            entry.update(latency_p50_ms_median=percentile(p50, 50), latency_p99_ms_max=max(p99) if p99 else None)
        modes[mode] = entry
    return modes


def markdown(env, rows, totals, modes=None) -> str:
    lines = ["# tally.ptx GPU check", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", f"- kernels checked: {totals['kernels']}, bit-identical checks: {totals['identical']}/{totals['checks']}, "
              f"failures: {totals['failures']}", "",
              "| kernel | modes | identical | original ms | throughput ratio (mode:config) | preempt p50 ms | preempt p99 ms (workers) | failures |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratios = " ".join(f"{k}={v}" for k, v in row["ratios"].items())
        lines.append(f"| {row['kernel']} | {row['modes']} | {row['identical']} | {fmt(row['original_ms'])} | {ratios} | "
                     f"{fmt(row['preempt_p50_ms'])} | {fmt(row['preempt_p99_ms'])} ({row['preempt_workers']}) | {row['failures']} |")
    if modes:
        lines += ["", "Per transformation (ratio = original ms / transformed ms, best configuration per kernel; "
                  "latency = retreat flag written -> kernel finished):", "",
                  "| transformation | kernels | ratio geomean | ratio min | ratio max | latency p50 ms (median over kernels) | latency p99 ms (max over kernels) |",
                  "|---|---|---|---|---|---|---|"]
        for mode, entry in modes.items():
            lines.append(f"| {mode} | {entry['kernels']} | {entry['best_ratio_geomean']:.3f} | {entry['best_ratio_min']:.3f} | "
                         f"{entry['best_ratio_max']:.3f} | {fmt(entry.get('latency_p50_ms_median'))} | "
                         f"{fmt(entry.get('latency_p99_ms_max'))} |")
    return "\n".join(lines) + "\n"


def fmt(value):
    return "-" if value is None else f"{value:.4f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="fewer trials and repetitions")
    parser.add_argument("--dry-run", action="store_true", help="CPU-side preparation only (no GPU needed)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--kernel", action="append", default=[], help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = np.random.default_rng(seed)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tally-ptx-gpu-"))
    plan = prepare(workdir)
    selected = [k for k in plan["kernels"] if k["launchable"] and k["modes"]
                and (not args.kernel or any(s in k["entry"] or s in k["module"] for s in args.kernel))]
    if args.dry_run:
        summary = {"seed": seed, "workdir": str(workdir), "kernels": len(plan["kernels"]),
                   "to_check": [f"{k['module']}:{k['entry']} ({','.join(k['modes'])})" for k in selected],
                   "refused": {f"{k['module']}:{k['entry']}": {m: refusal_text for m, refusal_text in k['expect_refusal'].items() if refusal_text}
                               for k in plan["kernels"] if set(k["modes"]) != set(MODES)}}
        (args.out / "ptx_gpu_check_plan.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return 0
    started = time.perf_counter()
    gpu = Gpu()
    records = []
    for kernel in selected:
        print(f"checking {kernel['module']}:{kernel['entry']} ({', '.join(kernel['modes'])}) ...", flush=True)
        try:
            records.append(check_kernel(gpu, plan, kernel, rng, args.quick))
        except Exception as exc:
            records.append({"kernel": f"{kernel['module']}:{kernel['entry']}", "modes": kernel["modes"], "checks": [],
                            "failures": [f"{type(exc).__name__}: {exc}"], "tracebacks": [traceback.format_exc()]})
    env = environment(gpu)
    env["seed"] = seed
    env["quick"] = args.quick
    env["seconds"] = round(time.perf_counter() - started, 1)
    rows = summarize(records)
    checks = [c for r in records for c in r["checks"]]
    totals = {"kernels": len(records), "checks": len(checks), "identical": sum(c["identical"] for c in checks),
              "failures": sum(len(r["failures"]) for r in records)}
    modes = per_transformation(records)
    (args.out / "ptx_gpu_check.json").write_text(
        json.dumps({"environment": env, "totals": totals, "summary": rows, "per_transformation": modes,
                    "records": records}, indent=1) + "\n")
    (args.out / "ptx_gpu_check.md").write_text(markdown(env, rows, totals, modes))
    print()
    for record in records:
        for failure in record["failures"]:
            print(f"FAIL {record['kernel']}: {failure}")
    print(f"{'kernel':48} {'identical':>10} {'p99 ms':>8}  ratios")
    for row in rows:
        ratios = " ".join(f"{k}={v}" for k, v in row["ratios"].items())
        print(f"{row['kernel'][:48]:48} {row['identical']:>10} {fmt(row['preempt_p99_ms']):>8}  {ratios}")
    for mode, entry in modes.items():
        print(f"{mode:12} ratio geomean {entry['best_ratio_geomean']:.3f} (min {entry['best_ratio_min']:.3f}, "
              f"max {entry['best_ratio_max']:.3f}, {entry['kernels']} kernels)"
              + (f"; preemption latency p50 {fmt(entry.get('latency_p50_ms_median'))} ms, "
                 f"p99 max {fmt(entry.get('latency_p99_ms_max'))} ms" if mode == "preemptible" else ""))
    print(f"bit-identical {totals['identical']}/{totals['checks']}, failures {totals['failures']}, "
          f"{env['seconds']} s; wrote {args.out / 'ptx_gpu_check.md'}")
    return 0 if totals["failures"] == 0 and totals["identical"] == totals["checks"] else 1


if __name__ == "__main__":
    sys.exit(main())
