"""What a second MPS client that runs nothing costs an HP job, inside one HP process.

On an H200 (benchmarks/results/issue3-floor-2026-12-03f-h200) HP's service time next to an
idle second client was -0.6% to +5.0% over five `tally bench` runs, each a new HP process. That
spread may be the client's doing or each HP process's own (where its memory landed, say). Here
one HP process runs requests back to back for the whole measurement while idle clients come
and go around it, so every variant is compared with phases of the same process alone:

  alone, VARIANT_1, alone, VARIANT_2, ..., alone     (ROUNDS times)

Variants (a client process that makes a CUDA context, fills some GPU memory once, and then
only sleeps: benchmarks/probe_workloads.py):
  mps            a plain client of the daemon's MPS, 0.01 GiB
  mps-16g        the same with 16 GiB
  mps-1conn      the same as mps with CUDA_DEVICE_MAX_CONNECTIONS=1 (one hardware queue)
  tally-be       started by `tally run --priority best-effort` (agent, MPS client priority 1,
                 tally's client settings); it launches nothing (its kernel would wait on the gate:
                 HP is never idle), so it never joins the scoreboard

HP is started by `tally run --priority high`, a registered workload (default
bert-infer@graph). It reports the mean and p10 of its service times every --window-s; a window
counts for a phase when it lies inside it, after the client said it was ready plus --settle-s.

    python3 benchmarks/second_client_cost.py --out DIR [--rounds 3] [--phase-s 4]
        [--variants mps,mps-16g,mps-1conn,tally-be] [--hp bert-infer@graph]

Writes second_client_cost.json and .md in DIR: per variant, the mean service time of its
phases against the alone phases right before and after each of them (paired), and the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpu_session import TALLY, daemon_down, daemon_up, heading, last_line, mps_env  # this directory is on sys.path

HERE = Path(__file__).resolve().parent

# Holds its context until its stdin closes: a client is never left behind by a parent that died.
IDLE_CLIENT = ("import sys\n"
               "from probe_workloads import IdleContext\n"
               "client = IdleContext(float(sys.argv[1]), touch=sys.argv[2] == '1')\n"
               "print('ready', flush=True)\n"
               "sys.stdin.read()\n")

# name -> (GiB the client allocates, environment it adds, started through `tally run --priority best-effort`).
# A tally BE client does not fill its memory: that kernel would wait on the gate until HP is idle, and
# here HP never is. So it launches nothing and never joins the scoreboard (the agent joins at the first
# launch): it measures an MPS client of priority 1 with the agent loaded, not HP closing its gate word.
VARIANTS = {
    "mps": (0.01, {}, False),
    "mps-16g": (16.0, {}, False),
    "mps-1conn": (0.01, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, False),
    "tally-be": (0.01, {}, True),
}


def hp_loop(workload: str, window_s: float) -> int:
    """The HP process: requests back to back; one JSON line per window on stdout, until stdin closes."""
    from tally.bench.workloads import build, parse_ref

    job = build(parse_ref(workload, role="hp"), "hp", {})
    for _ in range(20):  # warm-up
        job.step()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        start, times = time.monotonic(), []
        while time.monotonic() - start < window_s:
            t0 = time.perf_counter()
            job.step()
            times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps(window(start, time.monotonic(), times)), flush=True)
    return 0


def window(start: float, end: float, times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    return {"start": start, "end": end, "n": len(ordered), "mean_ms": statistics.mean(ordered),
            "p10_ms": ordered[int(0.1 * (len(ordered) - 1))]}


def assign(windows: list[dict], phases: list[dict]) -> None:
    """Each phase gets the windows that lie wholly inside it (from its settled start to its end)."""
    for phase in phases:
        inside = [w for w in windows if w["start"] >= phase["start"] and w["end"] <= phase["end"]]
        phase["windows"] = len(inside)
        phase["mean_ms"] = statistics.mean(w["mean_ms"] for w in inside) if inside else None
        phase["p10_ms"] = statistics.mean(w["p10_ms"] for w in inside) if inside else None


def summarize(phases: list[dict]) -> list[dict]:
    """Per variant: each of its phases against the mean of the alone phases next to it."""
    out: dict[str, dict] = {}
    for i, phase in enumerate(phases):
        if phase["variant"] == "alone" or phase.get("mean_ms") is None:
            continue
        around = [p["mean_ms"] for p in (phases[i - 1] if i else None, phases[i + 1] if i + 1 < len(phases) else None)
                  if p and p["variant"] == "alone" and p.get("mean_ms") is not None]
        if not around:
            continue
        row = out.setdefault(phase["variant"], {"variant": phase["variant"], "ratios": [], "means_ms": []})
        row["ratios"].append(phase["mean_ms"] / statistics.mean(around) - 1)
        row["means_ms"].append(phase["mean_ms"])
    for row in out.values():
        row["median"] = statistics.median(row["ratios"])
    # alone against alone: each alone phase against the alone phases next to it (two places away),
    # the drift and noise any variant's figure carries
    alone = [(i, p["mean_ms"]) for i, p in enumerate(phases) if p["variant"] == "alone" and p.get("mean_ms") is not None]
    ratios = []
    for i, mean in alone:
        around = [m for j, m in alone if abs(j - i) == 2]
        if around:
            ratios.append(mean / statistics.mean(around) - 1)
    rows = list(out.values())
    if ratios:
        rows.insert(0, {"variant": "alone", "ratios": ratios, "means_ms": [m for _, m in alone],
                        "median": statistics.median(ratios)})
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [heading("A second MPS client that runs nothing", env), "",
             f"HP `{result['hp']}` back to back in one process, {result['rounds']} rounds of alone / each variant, "
             f"{result['phase_s']:g} s phases, the variants' order rotated each round. Paired: each variant "
             "phase's mean service time against the alone phases next to it (for alone: each alone phase "
             "against the alone phases next to it, the spread without any client).", "",
             "| variant | phases | paired median | paired range | mean service ms per phase |",
             "|---|---|---|---|---|"]
    for row in result["summary"]:
        lines.append(f"| {row['variant']} | {len(row['ratios'])} | {row['median']:+.2%} | "
                     f"{min(row['ratios']):+.2%} to {max(row['ratios']):+.2%} | "
                     f"{', '.join(f'{m:.3f}' for m in row['means_ms'])} |")
    return "\n".join(lines) + "\n"


class Reader:
    """The HP process's window lines, read by a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.windows: list[dict] = []
        self.proc = proc
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready.set()
            elif line.startswith("{"):
                try:
                    self.windows.append(json.loads(line))
                except ValueError:
                    pass  # not ours: the program printed it


def wait_ready(proc: subprocess.Popen, ready: threading.Event, timeout: float, what: str) -> None:
    """Until `ready` is set; RuntimeError (one line) when `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready: {last_line(err)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout:g} s")


def start_client(variant: str, env: dict, timeout: float) -> subprocess.Popen:
    gib, extra, via_tally = VARIANTS[variant]
    client_env = dict(env, **extra)
    prefix: list[str] = TALLY + ["run", "--priority", "best-effort", "--"] if via_tally else []
    if not via_tally:
        client_env.update(mps_env())
    proc = subprocess.Popen(prefix + [sys.executable, "-c", IDLE_CLIENT, str(gib), "0" if via_tally else "1"],
                            env=client_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready = threading.Event()
    threading.Thread(target=lambda: (proc.stdout.readline().strip() == "ready" and ready.set()), daemon=True).start()
    try:
        wait_ready(proc, ready, timeout, f"idle client {variant}")
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Ends a child: its stdin closed (the idle client and the HP loop leave then), else TERM, else KILL."""
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, OSError):
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def round_order(variants: list[str], round_: int) -> list[str]:
    """Rotated each round, so that no variant always follows the same one (a client's after-effects)."""
    k = round_ % len(variants)
    return variants[k:] + variants[:k]


def measure(args, env: dict, phases: list[dict], reader_box: list) -> None:
    """Runs the phases, appending to `phases` as it goes (the caller keeps them on failure)."""
    variants = [v for v in args.variants.split(",") if v]
    hp = subprocess.Popen(TALLY + ["run", "--priority", "high", "--", sys.executable, str(Path(__file__).resolve()),
                                   "--hp-loop", args.hp, "--window-s", str(args.window_s)],
                          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reader = Reader(hp)
    reader_box.append(reader)
    try:
        wait_ready(hp, reader.ready, args.start_timeout_s, "the HP process")

        def phase(variant: str) -> None:
            start = time.monotonic() + args.settle_s
            time.sleep(args.settle_s + args.phase_s)
            if hp.poll() is not None:
                raise RuntimeError(f"the HP process exited ({hp.returncode}) during a {variant} phase")
            phases.append({"variant": variant, "start": start, "end": time.monotonic()})

        for r in range(args.rounds):
            for variant in round_order(variants, r):
                phase("alone")
                client = start_client(variant, env, args.start_timeout_s)
                try:
                    phase(variant)
                finally:
                    stop(client)
        phase("alone")
        time.sleep(args.window_s * 1.5)  # the last window lands
    finally:
        stop(hp)
        reader.thread.join(timeout=10)


def write(args, phases: list[dict], windows: list[dict], error: str | None) -> str:
    from gate_depth_cost import environment

    assign(windows, phases)
    result = {"environment": environment(), "hp": args.hp, "rounds": args.rounds, "phase_s": args.phase_s,
              "error": error, "phases": phases, "windows": windows, "summary": summarize(phases)}
    (args.out / "second_client_cost.json").write_text(json.dumps(result, indent=1))
    text = markdown(result) + (f"\nThe run stopped early: {error}\n" if error else "")
    (args.out / "second_client_cost.md").write_text(text)
    return text


def _terminate(signum, frame):
    raise KeyboardInterrupt  # the finally blocks stop the clients, HP and the daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hp", default="bert-infer@graph")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=4.0)
    parser.add_argument("--settle-s", type=float, default=0.5)
    parser.add_argument("--window-s", type=float, default=0.25)
    parser.add_argument("--start-timeout-s", type=float, default=120.0)
    parser.add_argument("--variants", default="mps,mps-16g,mps-1conn,tally-be")
    parser.add_argument("--hp-loop", metavar="WORKLOAD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hp_loop:
        return hp_loop(args.hp_loop, args.window_s)
    if args.out is None:
        parser.error("--out is required")
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    signal.signal(signal.SIGTERM, _terminate)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    args.out.mkdir(parents=True, exist_ok=True)
    error = daemon_up(env)
    if error:
        print(f"second_client_cost: {error}", file=sys.stderr)
        return 1
    phases: list[dict] = []
    reader_box: list[Reader] = []
    error = None
    try:
        measure(args, env, phases, reader_box)
    except (RuntimeError, KeyboardInterrupt) as exc:
        error = str(exc) or "interrupted"
        print(f"second_client_cost: {error}", file=sys.stderr)
    finally:
        daemon_down(env)
    windows = reader_box[0].windows if reader_box else []
    if phases:
        print(write(args, phases, windows, error))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
