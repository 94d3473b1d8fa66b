"""What the GPU-side gate (TALLY_GPU_GATE, agent/gpugate.c) can and cannot stop, on a real GPU.

The gate puts cuStreamWaitValue64(word, 1 << 63, AND) before each best-effort kernel, and an HP
launch closes the word (clears its top bit). Work that already passed its wait still runs. Two
unknowns decide whether the design pays, and this script measures both without the agent:

  lookahead   One stream gets N pairs [wait(word), probe kernel i], all enqueued behind a wait
              on a second, closed word, which is then opened: the GPU runs from a full queue,
              whatever the host's launch rate. Kernel i spins for --kernel-us and stores the
              word's value as it saw it when it started (a volatile load of the host-mapped
              word). The host closes the word partway through, waits, then reopens it with
              another value. Kernels that saw the closed value ran after the close: that count
              is how many kernels the GPU lets past a closed gate. A round whose close came
              before the first kernel or after the last is marked invalid.
  wait cost   The same N kernels with and without a wait before each (the word open), timed
              with events, again from a full queue: what a wait costs a BE kernel stream when
              nothing is closed.

    python3 benchmarks/gpu_gate_lookahead.py --out DIR [--kernel-us 20,100] [--rounds 5]

Needs a CUDA GPU and CuPy. Writes gpu_gate_lookahead.json and .md in DIR.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tally.bench.runner import collect_environment  # noqa: E402
from tally.scoreboard import GPU_GATE_OPEN as OPEN  # noqa: E402  (the agent's value, defined once)
from gpu_session import heading  # noqa: E402  (this directory is on sys.path)

REOPENED = OPEN | 2
CLOSED = 12345
WAIT_VALUE_AND = 0x2

PROBE = r"""
extern "C" __global__ void probe(const volatile unsigned long long *word, unsigned long long *seen,
                                 int i, unsigned long long spin_ns) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        seen[i] = *word;
        unsigned long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < spin_ns);
    }
}
"""


def summarize(seen: list[int]) -> dict:
    """Which kernels ran before the close, after it (past their wait: the lookahead), after the
    reopening, or not at all."""
    before = sum(1 for v in seen if v == OPEN)
    after_close = sum(1 for v in seen if v == CLOSED)
    reopened = sum(1 for v in seen if v == REOPENED)
    return {"before_close": before, "lookahead": after_close, "after_reopen": reopened,
            "never_ran": len(seen) - before - after_close - reopened, "valid": before > 0 and reopened > 0}


def median_of_samples(samples: list[float]) -> float:
    """The median of the samples the watchdog did not spoil (NaN); NaN when none is left."""
    kept = [v for v in samples if v == v]
    return statistics.median(kept) if kept else float("nan")


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [heading("GPU-side gate: lookahead and wait cost", env), "",
             "Kernels that started after the word was closed (they had passed their wait already), "
             "per round; and the time per kernel of a stream with a wait before each kernel, against "
             "one without (word open).", "",
             "| kernel us | lookahead per round | median | ran before the close / after the reopening | "
             "us per kernel without waits | with waits | wait cost us | watchdog fired |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        looks = [r["lookahead"] for r in row["rounds"] if r["valid"]] or [float("nan")]
        split = ", ".join(f"{r['before_close']}/{r['after_reopen']}" for r in row["rounds"])
        lines.append(f"| {row['kernel_us']} | {', '.join(map(str, looks))} | {statistics.median(looks):g} | {split} | "
                     f"{row['us_per_kernel_plain']:.2f} | {row['us_per_kernel_waits']:.2f} | "
                     f"{row['us_per_kernel_waits'] - row['us_per_kernel_plain']:+.2f} | "
                     f"{row.get('watchdog_fired', 0)} |")
    return "\n".join(lines) + "\n"


class HostWord:
    """A 64-bit word in mapped, pinned host memory: the host stores into it, the GPU polls it."""

    def __init__(self, cp, cuda):
        self.host = cp.cuda.runtime.hostAlloc(8, cp.cuda.runtime.hostAllocMapped)
        self.value = ctypes.c_uint64.from_address(self.host)
        device = ctypes.c_uint64()
        r = cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(device), ctypes.c_void_p(self.host), 0)
        if r != 0:
            raise RuntimeError(f"cuMemHostGetDevicePointer failed: CUresult {r}")
        self.device = device.value

    def set(self, value: int) -> None:
        self.value.value = value


class Gpu:
    def __init__(self):
        import cupy

        self.cp = cupy
        self.cuda = ctypes.CDLL("libcuda.so.1")
        # the _v2 entry point first, as the agent does: the old one may refuse without a driver option
        self.wait_value = getattr(self.cuda, "cuStreamWaitValue64_v2", None) or self.cuda.cuStreamWaitValue64
        self.wait_value.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
        self.wait_value.restype = ctypes.c_int
        self.cuda.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p,
                                                             ctypes.c_uint]
        self.word = HostWord(cupy, self.cuda)  # the gate
        self.hold = HostWord(cupy, self.cuda)  # holds the stream until everything is enqueued
        self.kernel = cupy.RawKernel(PROBE, "probe")
        self.stream = cupy.cuda.Stream(non_blocking=True)
        # Compile and load the kernel before any stream is held: a module load may wait for the
        # device, which would wait for the hold word only this thread could open.
        self.word.set(OPEN)
        with self.stream:
            self.kernel((1,), (32,), (self.cp.uint64(self.word.device), self.cp.zeros(1, dtype=self.cp.uint64),
                                      self.cp.int32(0), self.cp.uint64(0)))
        self.stream.synchronize()
        self.watchdog_fired = 0

    def wait(self, word: HostWord) -> None:
        r = self.wait_value(ctypes.c_void_p(self.stream.ptr), word.device, OPEN, WAIT_VALUE_AND)
        if r != 0:
            raise RuntimeError(f"cuStreamWaitValue64 failed: CUresult {r}")

    def enqueue_held(self, seen, n: int, spin_ns: int, waits: bool, events=None) -> None:
        """Enqueues n kernels (each behind a wait on the gate with `waits`) behind a closed hold
        word, then opens it: the GPU starts on a full queue."""
        self.stream.synchronize()
        self.hold.set(0)
        # If the driver's queue fills before everything is enqueued, a launch blocks until the
        # GPU drains it, which the hold forbids: a watchdog opens the hold (the round is marked).
        watchdog = threading.Timer(2.0, self._release_hold)
        watchdog.start()
        with self.stream:
            self.wait(self.hold)
            if events:
                events[0].record(self.stream)
            for i in range(n):
                if waits:
                    self.wait(self.word)
                self.kernel((1,), (32,), (self.cp.uint64(self.word.device), seen, self.cp.int32(i),
                                          self.cp.uint64(spin_ns)))
            if events:
                events[1].record(self.stream)
        watchdog.cancel()
        self.hold.set(OPEN)

    def _release_hold(self) -> None:
        self.watchdog_fired += 1
        self.hold.set(OPEN)
        self.word.set(OPEN)

    def lookahead(self, n: int, kernel_us: int, close_after_s: float, hold_s: float) -> dict:
        seen = self.cp.zeros(n, dtype=self.cp.uint64)
        self.word.set(OPEN)
        fired = self.watchdog_fired
        self.enqueue_held(seen, n, kernel_us * 1000, waits=True)
        if self.watchdog_fired != fired:
            self.stream.synchronize()
            return {**summarize([]), "valid": False, "queue_full": True}
        time.sleep(close_after_s)
        self.word.set(CLOSED)
        time.sleep(hold_s)  # whatever passed its wait before the close has started by now
        self.word.set(REOPENED)
        self.stream.synchronize()
        return summarize([int(v) for v in self.cp.asnumpy(seen)])

    def per_kernel_us(self, n: int, kernel_us: int, waits: bool) -> float:
        seen = self.cp.zeros(n, dtype=self.cp.uint64)
        self.word.set(OPEN)
        events = (self.cp.cuda.Event(), self.cp.cuda.Event())
        fired = self.watchdog_fired
        self.enqueue_held(seen, n, kernel_us * 1000, waits, events)
        events[1].synchronize()
        if self.watchdog_fired != fired:  # the GPU idled behind the hold until the watchdog: no sample
            return float("nan")
        return self.cp.cuda.get_elapsed_time(*events) * 1000 / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kernel-us", default="20,100", help="probe kernel lengths, comma-separated")
    parser.add_argument("--kernels", type=int, default=128,
                        help="kernels per stream (each with its wait: stay under the driver's queue of pending work)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        lengths = [int(v) for v in args.kernel_us.split(",") if v]
    except ValueError:
        parser.error(f"--kernel-us takes whole microseconds, not {args.kernel_us!r}")
    try:
        gpu = Gpu()
    except (ImportError, OSError, AttributeError) as exc:  # no CuPy, no libcuda: one line, no traceback
        print(f"gpu_gate_lookahead: needs a CUDA GPU and CuPy ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    except Exception as exc:  # CuPy's CUDA errors (no device, a driver too old), ours above
        if type(exc).__module__.startswith("cupy") or isinstance(exc, RuntimeError):
            print(f"gpu_gate_lookahead: needs a CUDA GPU and CuPy ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        raise
    rows = []
    for kernel_us in lengths:
        n = args.kernels
        print(f"kernel {kernel_us} us: {n} kernels, {args.rounds} rounds", flush=True)
        # The GPU starts on the full queue: close a third of the way through, and hold it closed
        # as long as the whole stream would take, so whatever passed its wait before the close
        # has started (and recorded CLOSED) before the reopening.
        run_s = n * kernel_us * 1e-6
        rounds = [gpu.lookahead(n, kernel_us, close_after_s=run_s / 3, hold_s=run_s + 0.02)
                  for _ in range(args.rounds)]
        plain = median_of_samples([gpu.per_kernel_us(n, kernel_us, waits=False) for _ in range(3)])
        waited = median_of_samples([gpu.per_kernel_us(n, kernel_us, waits=True) for _ in range(3)])
        rows.append({"kernel_us": kernel_us, "kernels": n, "rounds": rounds, "us_per_kernel_plain": plain,
                     "us_per_kernel_waits": waited, "watchdog_fired": gpu.watchdog_fired})
        print(f"kernel {kernel_us} us: watchdog fired {gpu.watchdog_fired} time(s); lookahead {[r['lookahead'] for r in rounds]}, "
              f"{plain:.2f} -> {waited:.2f} us per kernel with waits", flush=True)
    result = {"environment": {**collect_environment(), "cupy": gpu.cp.__version__}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_gate_lookahead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu_gate_lookahead.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
