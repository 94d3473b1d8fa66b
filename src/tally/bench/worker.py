"""The process that runs ONE workload.

    python -m tally.bench.worker --workload NAME --role hp|be --result FILE [...]

role hp (inference server, open loop): replays the arrival offsets of
--arrivals. Request i is due at go + offset_i; requests are served one at a time
in arrival order, so a request that arrives while the server is busy queues.
For each request the worker records (due time, service start, completion) on
the system-wide monotonic clock and nothing else; latencies are computed later
(tally.bench.metrics). `step()` returns only after the request's GPU work has
completed (the workload synchronizes its stream).

role be (trainer): trains back to back until SIGTERM/SIGINT or --duration, and
records each step's completion time, so the runner can compute the throughput
inside any window.

Both roles first warm up (at least --warmup-steps steps and --warmup-s seconds:
cuDNN autotuning, torch.compile, CUDA-graph capture happen there), then collect
and freeze the Python heap (gc.freeze: see settle_heap), then write
--ready-file. The server then waits for --go-file (the runner creates it when
every process of the run is warm) before replaying arrivals.

--measure-capacity: after warm-up, serve requests back to back for
--capacity-s seconds and report the mean service time and throughput.
--self-check: build the workload(s) with a small batch, run two steps, print
PASS/FAIL per workload (`--workload all` checks every registered workload in
one process).

SIGTERM/SIGINT: the worker stops at the next step boundary, writes what it
has (marked interrupted) and exits 0 for be (being stopped is how a trainer
ends) and 3 for hp.

--control DIR (session mode, reused workers): build and warm up once, write
DIR/ready, then obey numbered commands until told to exit. The protocol (all
files written atomically, write-to-temp + rename; the runner writes cmd-N,
the worker everything else; N counts 1, 2, ... without gaps):

  runner  DIR/cmd-N.json   {"op": "serve", "arrivals": F, "go_file": F, "result": F,
                             "warmup_steps": k, "warmup_s": s}                     (hp)
                           {"op": "capacity", "capacity_s": s, "result": F, ...}  (hp)
                           {"op": "train", "stop_file": F, "duration": s|null,
                             "result": F, "warmup_steps": k, "warmup_s": s}       (be)
                           {"op": "exit"}
  worker  DIR/ack-N.json   {"time": t}  the re-warm-up is over: ready for go/measuring
  worker  F (result)       the same result JSON as one-shot mode, plus "session"
  worker  DIR/done-N.json  {"time": t, "ok": bool, "error": ...}  command N is over

Between commands the worker is paused: it only polls for cmd-(N+1) (every
5 ms, no GPU work). A train command ends when its stop_file appears (checked
at every step boundary) or after its duration. Every command but exit starts
with a short re-warm-up (at least warmup_steps steps and warmup_s seconds):
the first steps after a pause carry clock ramp-up and allocator/cache refills,
which must not land in the window. A worker with no command for
--idle-timeout-s exits (the runner is gone). SIGTERM/SIGINT: write what the
current command has (interrupted), then exit.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from tally.errors import TallyError
from tally.files import write_text_atomic

now = time.monotonic  # CLOCK_MONOTONIC: one clock for all processes of the host

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 3


class StopRequested(Exception):
    """Raised in the main thread by the first SIGTERM/SIGINT."""


class _Signals:
    def __init__(self) -> None:
        self.stopped = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.stopped:
            return  # already stopping: let the current write finish
        self.stopped = True
        raise StopRequested(signal.Signals(signum).name)

    def disarm(self) -> None:
        self.stopped = True


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data))


def sleep_until(deadline: float) -> None:
    """Sleep to `deadline` (monotonic) with sub-0.1 ms accuracy: coarse sleep, then spin."""
    while True:
        remaining = deadline - now()
        if remaining <= 0:
            return
        if remaining > 0.002:
            time.sleep(remaining - 0.001)
        # spin the last millisecond: time.sleep overshoots by ~0.05-0.1 ms


GC_FREEZE_ENV = "TALLY_BENCH_GC_FREEZE"  # "0": leave the collector as it is (to measure what freezing changes)


def settle_heap() -> bool:
    """Collect once, then freeze every surviving object out of the collector's reach.

    With torch loaded the heap holds many long-lived objects; a full
    (generation 2) collection walks all of them, and the pause lands in
    whichever request is being served. Serving stacks freeze the heap after
    warm-up for this reason (vLLM does). On an H100 with BERT eager it did not
    explain the latency spikes of that workload (benchmarks/results/
    diag-2026-11-25: 3 collections, 1.3 ms at most, in 8 s unfrozen), but the
    recorded pauses (GcPauses) now rule the collector in or out per run.
    Done the same way for every system, so comparisons stay fair; returns
    whether the heap was frozen."""
    if os.environ.get(GC_FREEZE_ENV, "1") == "0":
        return False
    gc.collect()
    gc.freeze()
    return True


class GcPauses:
    """Garbage-collector pauses inside a measured window, via gc.callbacks. With `into`, the
    pauses are stored as into["gc"] when the window ends, however it ends (a stop included)."""

    def __init__(self, into: dict | None = None):
        self._into = into
        self.collections = [0, 0, 0]
        self.total_s = 0.0
        self.max_s = 0.0
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = now()
        elif self._started is not None:
            pause = now() - self._started
            self._started = None
            self.collections[min(int(info.get("generation", 0)), 2)] += 1
            self.total_s += pause
            self.max_s = max(self.max_s, pause)

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
        if self._into is not None:
            self._into["gc"] = self.to_json()

    def to_json(self) -> dict:
        return {"collections_by_generation": list(self.collections), "pause_total_s": self.total_s,
                "pause_max_s": self.max_s}


def warm_up(workload, min_steps: int, min_seconds: float) -> dict:
    started = now()
    steps = 0
    while steps < min_steps or now() - started < min_seconds:
        workload.step()
        steps += 1
    return {"steps": steps, "seconds": now() - started, "heap_frozen": settle_heap()}


def wait_for_file(path: Path, timeout_s: float, what: str = "go file") -> float:
    deadline = now() + timeout_s
    while not path.exists():
        if now() > deadline:
            raise TallyError(f"{what} {path} did not appear within {timeout_s:g} s")
        time.sleep(0.002)
    return now()


def serve(workload, offsets: list[float], go: float, deadline: float, record: list) -> None:
    """Open-loop replay: request i due at go + offsets[i]; FIFO, one at a time."""
    for offset in offsets:
        due = go + offset
        if due > now():
            sleep_until(due)
        start = now()
        if start > deadline:
            return  # overloaded past the deadline: the rest counts as incomplete
        workload.step()
        record.append((due, start, now()))


def service_times(workload, seconds: float, min_requests: int = 10) -> tuple[list[float], float]:
    """Back-to-back requests for `seconds` (at least `min_requests`): each one's service
    time, and the wall time they took together."""
    service: list[float] = []
    started = now()
    while len(service) < min_requests or now() - started < seconds:
        t0 = now()
        workload.step()
        service.append(now() - t0)
    return service, now() - started


def measure_capacity(workload, seconds: float, min_requests: int = 10) -> dict:
    service, total = service_times(workload, seconds, min_requests)
    service.sort()
    mean = sum(service) / len(service)
    return {
        "requests": len(service),
        "service_time_s": mean,
        "median_s": service[len(service) // 2],
        "p99_s": service[min(len(service) - 1, int(0.99 * len(service)))],
        "throughput_rps": len(service) / total,
    }


def _base_result(args, ref) -> dict:
    return {
        "role": args.role,
        "workload": ref.describe(),
        "options": args.options,
        "pid": os.getpid(),
        "clock": "CLOCK_MONOTONIC",
        "hp_stream_priority_env": os.environ.get("TALLY_BENCH_HP_STREAM_PRIORITY"),
        "interrupted": False,
        "error": None,
    }


def _start(args):
    """What every worker does first: catch signals, resolve the workload, and
    fill in the fields every result carries."""
    from tally.bench import workloads as registry

    signals = _Signals()
    signals.install()
    options = registry.parse_options(args.option)
    args.options = options
    ref = registry.parse_ref(args.workload, role=args.role, command=args.command)
    return registry, signals, options, ref, _base_result(args, ref)


def run(args) -> int:
    registry, signals, options, ref, result = _start(args)
    result_path = Path(args.result)
    workload = None
    record: list = []
    exit_code = EXIT_OK
    try:
        t_build = now()
        workload = registry.build(ref, args.role, options)
        result["build_s"] = now() - t_build
        result["info"] = registry.workload_info(workload)
        if args.role == "hp":
            offsets: list[float] = []
            if not args.measure_capacity:
                from tally.bench.traces import Arrivals

                arrivals = Arrivals.read(args.arrivals)
                offsets = arrivals.offsets_s
                result["offered"] = len(offsets)
                result["arrivals"] = {k: v for k, v in arrivals.to_json().items() if k != "offsets_s"}
            result["warmup"] = warm_up(workload, args.warmup_steps, args.warmup_s)
            if args.measure_capacity:
                result["capacity"] = measure_capacity(workload, args.capacity_s)
            else:
                _signal_ready(args)
                go = wait_for_file(Path(args.go_file), args.start_timeout_s) if args.go_file else now()
                result["go_time"] = go
                duration = arrivals.duration_s
                # an overloaded server stops serving at go + 2 x duration (+10 s);
                # what was not served by then is reported as incomplete
                with GcPauses(into=result):
                    serve(workload, offsets, go, go + 2 * duration + 10, record)
        else:
            result["warmup"] = warm_up(workload, args.warmup_steps, args.warmup_s)
            _signal_ready(args)
            result["measure_start_time"] = now()
            deadline = result["measure_start_time"] + args.duration
            with GcPauses(into=result):
                while now() < deadline:
                    workload.step()
                    record.append(now())
    except StopRequested as stop:
        result["interrupted"] = True
        result["stopped_by"] = str(stop)
        exit_code = EXIT_OK if args.role == "be" else EXIT_INTERRUPTED
    except TallyError as exc:
        result["error"] = str(exc)
        exit_code = EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - any failure must still leave a result file
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        exit_code = EXIT_ERROR
    signals.disarm()
    if args.role == "hp":
        result["requests"] = [list(r) for r in record]
    else:
        result["step_end_times"] = record
    finish(result, result_path, workload, "tally bench worker")
    return exit_code


def finish(result: dict, result_path: Path, workload, who: str) -> None:
    """Stamp the end, write the result file (atomically), report its error on stderr,
    then close the workload: the result is on disk before anything can fail."""
    result["end_time"] = now()
    write_json_atomic(result_path, result)
    if result.get("error"):
        print(f"{who}: {result['error']}", file=sys.stderr)
        if result.get("traceback"):
            print(result["traceback"], file=sys.stderr)
    if workload is not None and callable(getattr(workload, "close", None)):
        try:
            workload.close()
        except Exception:  # noqa: BLE001 - closing must not mask the result
            pass


# ---------------------------------------------------------------- session mode (reused workers)

POLL_S = 0.005


def _wait_command(control: Path, seq: int, timeout_s: float) -> dict | None:
    """The command cmd-<seq>.json, or None after `timeout_s` without one."""
    path = control / f"cmd-{seq}.json"
    deadline = now() + timeout_s
    while True:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            pass
        except ValueError:
            pass  # cannot happen with an atomic rename; retry anyway
        if now() > deadline:
            return None
        time.sleep(POLL_S)


def _session_command(workload, args, base: dict, command: dict, control: Path, seq: int) -> dict:
    """Run one command; returns the result dict (also on StopRequested, re-raised after writing)."""
    result = dict(base)
    result["session"] = {"seq": seq, "op": command["op"], "commands_before": seq - 1}
    record: list = []
    op = command["op"]
    try:
        result["warmup"] = warm_up(workload, int(command.get("warmup_steps", 1)), float(command.get("warmup_s", 0.0)))
        if op == "capacity":
            write_json_atomic(control / f"ack-{seq}.json", {"time": now()})
            result["capacity"] = measure_capacity(workload, float(command["capacity_s"]))
        elif op == "serve":
            from tally.bench.traces import Arrivals

            arrivals = Arrivals.read(command["arrivals"])
            result["offered"] = len(arrivals.offsets_s)
            result["arrivals"] = {k: v for k, v in arrivals.to_json().items() if k != "offsets_s"}
            write_json_atomic(control / f"ack-{seq}.json", {"time": now()})
            go = wait_for_file(Path(command["go_file"]), float(command.get("go_timeout_s", args.start_timeout_s)))
            result["go_time"] = go
            with GcPauses(into=result):
                serve(workload, arrivals.offsets_s, go, go + 2 * arrivals.duration_s + 10, record)
        elif op == "train":
            write_json_atomic(control / f"ack-{seq}.json", {"time": now()})
            stop_file = Path(command["stop_file"])
            result["measure_start_time"] = now()
            duration = command.get("duration")
            deadline = result["measure_start_time"] + float(duration) if duration else math.inf
            with GcPauses(into=result):
                while now() < deadline and not stop_file.exists():
                    workload.step()
                    record.append(now())
        else:
            raise TallyError(f"unknown command {op!r}")
    except TallyError as exc:
        result["error"] = str(exc)
    except StopRequested as stop:
        result["interrupted"] = True
        result["stopped_by"] = str(stop)
        raise
    except Exception as exc:  # noqa: BLE001 - the runner must get a result
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        if args.role == "hp":
            result["requests"] = [list(r) for r in record]
        else:
            result["step_end_times"] = record
        result["end_time"] = now()
        write_json_atomic(Path(command["result"]), result)
    return result


def run_session(args) -> int:
    """--control DIR: build and warm up once, then obey cmd-N files (see the module doc)."""
    registry, signals, options, ref, base = _start(args)
    control = Path(args.control)
    workload = None
    exit_code = EXIT_OK
    seq = 0
    try:
        t_build = now()
        workload = registry.build(ref, args.role, options)
        base["build_s"] = now() - t_build
        base["info"] = registry.workload_info(workload)
        warm = warm_up(workload, args.warmup_steps, args.warmup_s)
        base["startup_warmup"] = warm
        write_json_atomic(control / "ready", {"pid": os.getpid(), "time": now(), "build_s": base["build_s"],
                                              "warmup": warm})
        while True:
            command = _wait_command(control, seq + 1, args.idle_timeout_s)
            if command is None:
                print(f"tally bench worker: no command for {args.idle_timeout_s:g} s; exiting", file=sys.stderr)
                break
            seq += 1
            if command.get("op") == "exit":
                write_json_atomic(control / f"done-{seq}.json", {"time": now(), "ok": True, "error": None})
                break
            result = _session_command(workload, args, base, command, control, seq)
            write_json_atomic(control / f"done-{seq}.json",
                              {"time": now(), "ok": not result.get("error"), "error": result.get("error")})
    except StopRequested:
        exit_code = EXIT_OK if args.role == "be" else EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - build/warm-up failed: say why in the control dir
        error = str(exc) if isinstance(exc, TallyError) else f"{type(exc).__name__}: {exc}"
        write_json_atomic(control / "failed", {"time": now(), "error": error})
        print(f"tally bench worker: {error}", file=sys.stderr)
        if not isinstance(exc, TallyError):
            traceback.print_exc()
        exit_code = EXIT_ERROR
    signals.disarm()
    if workload is not None and callable(getattr(workload, "close", None)):
        try:
            workload.close()
        except Exception:  # noqa: BLE001
            pass
    return exit_code


def _signal_ready(args) -> None:
    if args.ready_file:
        write_json_atomic(Path(args.ready_file), {"pid": os.getpid(), "time": now()})


def self_check(args) -> int:
    """Build each workload small, run two steps, print one PASS/FAIL line each."""
    from tally.bench import workloads as registry

    if args.workload == "all":
        refs = []
        for name, spec in registry.REGISTRY.items():
            if spec.fake and not args.include_fakes:
                continue
            for variant in spec.variants:
                if variant.startswith("compile") and not args.include_compile:
                    continue
                refs.append(registry.parse_ref(f"{name}@{variant}"))
    else:
        refs = [registry.parse_ref(args.workload, command=args.command)]
    base_options = registry.parse_options(args.option)
    failures = 0
    for ref in refs:
        role = "be" if (ref.spec and ref.spec.kind == registry.TRAIN) else args.role
        options = dict(base_options)
        if ref.spec is not None and not ref.spec.fake and ref.spec.batch_size > 1:
            options.setdefault("batch", 2)
        label = f"{ref.spec.name}@{ref.variant}" if ref.spec else ref.text
        t0 = now()
        workload = None
        try:
            workload = registry.build(ref, role, options)
            built = now() - t0
            for _ in range(2):
                workload.step()
            check = getattr(workload, "check", None)
            detail = check() if callable(check) else ""
            print(f"PASS {label:28s} build {built:6.2f} s, 2 steps {now() - t0 - built:6.2f} s {detail}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next workload
            failures += 1
            last = str(exc).strip().splitlines()[-1:] or [""]
            print(f"FAIL {label:28s} {type(exc).__name__}: {last[0][:300]}", flush=True)
            if args.verbose:
                traceback.print_exc()
        finally:
            if workload is not None and callable(getattr(workload, "close", None)):
                try:
                    workload.close()
                except Exception:  # noqa: BLE001
                    pass
            del workload
            _release_gpu_memory()
    print(f"self-check: {len(refs) - failures} passed, {failures} failed", flush=True)
    return EXIT_OK if failures == 0 else EXIT_ERROR


def _release_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - dynamo may not be loaded
            pass


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m tally.bench.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, help="NAME[@VARIANT], module:function, 'command', or 'all' (self-check)")
    parser.add_argument("--role", choices=("hp", "be"), default="hp")
    parser.add_argument("--result", help="result JSON path")
    parser.add_argument("--arrivals", help="arrivals JSON (role hp)")
    parser.add_argument("--ready-file")
    parser.add_argument("--go-file")
    parser.add_argument("--duration", type=float, default=3600.0, help="be: stop after this many seconds")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--measure-capacity", action="store_true")
    parser.add_argument("--capacity-s", type=float, default=3.0)
    parser.add_argument("--command", help="the program of workload 'command' (line protocol, see workloads.py)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="workload option")
    parser.add_argument("--control", help="session mode: the control dir of the runner's commands (reused worker)")
    parser.add_argument("--idle-timeout-s", type=float, default=1800.0,
                        help="session mode: exit after this long without a command")
    parser.add_argument("--self-check", action="store_true")
    parser.add_argument("--include-compile", action="store_true", help="self-check: also torch.compile variants (slow)")
    parser.add_argument("--include-fakes", action="store_true", help="self-check all: also the CPU fakes")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.self_check and not args.control:
        if not args.result:
            parser.error("--result is required")
        if args.role == "hp" and not args.measure_capacity and not args.arrivals:
            parser.error("role hp needs --arrivals (or --measure-capacity)")
    if args.workload == "all" and not args.self_check:
        parser.error("--workload all is only for --self-check")
    if args.duration <= 0 or not math.isfinite(args.duration):
        parser.error("--duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.self_check:
        return self_check(args)
    if args.control:
        return run_session(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
