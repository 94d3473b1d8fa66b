"""What the GPU-side gate (TALLY_GPU_GATE, agent/gpugate.c) can and cannot stop, on a real GPU.

The gate puts cuStreamWaitValue64(word, 1 << 63, AND) before each best-effort kernel, and an HP
launch closes the word (clears its top bit). Work that already passed its wait still runs. Two
unknowns decide whether the design pays, and this script measures both without the agent:

  lookahead   One stream gets N pairs [wait(word), probe kernel i]. Kernel i spins for
              --kernel-us and stores the word's value as it saw it when it started (a volatile
              load of the host-mapped word). The host closes the word partway through, waits,
              then reopens it with another value. Kernels that saw the closed value ran after
              the close: that count is how many kernels the GPU lets past a closed gate.
  wait cost   The same N kernels with and without a wait before each (the word open), timed
              with events: what a wait costs a BE kernel stream when nothing is closed.

    python3 benchmarks/gpu_gate_lookahead.py --out DIR [--kernel-us 20,100] [--rounds 5]

Needs a CUDA GPU and CuPy. Writes gpu_gate_lookahead.json and .md in DIR.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPEN = 1 << 63
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
            "never_ran": len(seen) - before - after_close - reopened}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU-side gate: lookahead and wait cost ({env['date']}, {env['gpu']})", "",
             "Kernels that started after the word was closed (they had passed their wait already), "
             "per round; and the time per kernel of a stream with a wait before each kernel, against "
             "one without (word open).", "",
             "| kernel us | lookahead per round | median | ran before the close / after the reopening | "
             "us per kernel without waits | with waits | wait cost us |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        looks = [r["lookahead"] for r in row["rounds"]]
        split = ", ".join(f"{r['before_close']}/{r['after_reopen']}" for r in row["rounds"])
        lines.append(f"| {row['kernel_us']} | {', '.join(map(str, looks))} | {statistics.median(looks):g} | {split} | "
                     f"{row['us_per_kernel_plain']:.2f} | {row['us_per_kernel_waits']:.2f} | "
                     f"{row['us_per_kernel_waits'] - row['us_per_kernel_plain']:+.2f} |")
    return "\n".join(lines) + "\n"


class Gpu:
    def __init__(self):
        import cupy

        self.cp = cupy
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.cuda.cuStreamWaitValue64.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
        self.cuda.cuStreamWaitValue64.restype = ctypes.c_int
        self.host = cupy.cuda.runtime.hostAlloc(8, cupy.cuda.runtime.hostAllocMapped)
        self.word = ctypes.c_uint64.from_address(self.host)
        self.device_word = cupy.cuda.runtime.hostGetDevicePointer(self.host, 0)
        self.kernel = cupy.RawKernel(PROBE, "probe")
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def set_word(self, value: int) -> None:
        self.word.value = value

    def enqueue(self, seen, n: int, spin_ns: int, waits: bool) -> None:
        with self.stream:
            for i in range(n):
                if waits:
                    r = self.cuda.cuStreamWaitValue64(ctypes.c_void_p(self.stream.ptr), self.device_word, OPEN,
                                                      WAIT_VALUE_AND)
                    if r != 0:
                        raise RuntimeError(f"cuStreamWaitValue64 failed: CUresult {r}")
                self.kernel((1,), (32,), (self.device_word, seen, self.cp.int32(i), self.cp.uint64(spin_ns)))

    def lookahead(self, n: int, kernel_us: int, close_after_s: float, hold_s: float) -> dict:
        seen = self.cp.zeros(n, dtype=self.cp.uint64)
        self.stream.synchronize()
        self.set_word(OPEN)
        self.enqueue(seen, n, kernel_us * 1000, waits=True)
        time.sleep(close_after_s)
        self.set_word(CLOSED)
        time.sleep(hold_s)  # whatever passed its wait before the close has finished by now
        self.set_word(REOPENED)
        self.stream.synchronize()
        return summarize([int(v) for v in self.cp.asnumpy(seen)])

    def per_kernel_us(self, n: int, kernel_us: int, waits: bool) -> float:
        seen = self.cp.zeros(n, dtype=self.cp.uint64)
        self.set_word(OPEN)
        start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
        self.stream.synchronize()
        start.record(self.stream)
        self.enqueue(seen, n, kernel_us * 1000, waits)
        end.record(self.stream)
        end.synchronize()
        return self.cp.cuda.get_elapsed_time(start, end) * 1000 / n


def environment() -> dict:
    out = {"date": dt.datetime.now().isoformat(timespec="seconds")}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        out["gpu"] = smi.stdout.strip()
    except OSError:
        out["gpu"] = "?"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kernel-us", default="20,100", help="probe kernel lengths, comma-separated")
    parser.add_argument("--kernels", type=int, default=2000, help="kernels per stream")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        lengths = [int(v) for v in args.kernel_us.split(",") if v]
    except ValueError:
        parser.error(f"--kernel-us takes whole microseconds, not {args.kernel_us!r}")
    try:
        gpu = Gpu()
    except Exception as exc:  # no CuPy, no driver, no GPU: one line, no traceback
        print(f"gpu_gate_lookahead: needs a CUDA GPU and CuPy ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    rows = []
    for kernel_us in lengths:
        n = args.kernels
        # Close 2 ms after the enqueueing returned (the driver's queue may have made it wait for
        # the GPU, so little may be left), and hold it closed as long as the whole stream would
        # take: whatever passed its wait has started (and recorded CLOSED) before the reopening.
        rounds = [gpu.lookahead(n, kernel_us, close_after_s=0.002, hold_s=n * kernel_us * 1e-6 + 0.02)
                  for _ in range(args.rounds)]
        plain = statistics.median(gpu.per_kernel_us(n, kernel_us, waits=False) for _ in range(3))
        waited = statistics.median(gpu.per_kernel_us(n, kernel_us, waits=True) for _ in range(3))
        rows.append({"kernel_us": kernel_us, "kernels": n, "rounds": rounds, "us_per_kernel_plain": plain,
                     "us_per_kernel_waits": waited})
        print(f"kernel {kernel_us} us: lookahead {[r['lookahead'] for r in rounds]}, "
              f"{plain:.2f} -> {waited:.2f} us per kernel with waits", flush=True)
    result = {"environment": environment(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_gate_lookahead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu_gate_lookahead.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
