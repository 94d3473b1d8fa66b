"""Several GPUs per node (issue 7): one scoreboard per GPU, clients on different GPUs independent.

On a machine with at least two GPUs:

    source benchmarks/gpu_env.sh && python3 benchmarks/multi_gpu_demo.py --out /tmp/mgpu

`tally up` takes every visible GPU; then three runs of the same small
best-effort (BE) training loop, each for --seconds:

  alone        BE on GPU 1, nothing else
  other-gpu    BE on GPU 1 while a high-priority (HP) job keeps GPU 0 busy
  same-gpu     BE on GPU 0 while the same HP job keeps GPU 0 busy

Each client picks its GPU with CUDA_VISIBLE_DEVICES, as users would. The
expectation: "other-gpu" runs like "alone" (its scoreboard has no HP client,
so the gate never holds it: held_ms stays 0), while "same-gpu" is held.
`tally status --json` is sampled every 0.25 s for each client's GPU, held time
and launches; BE reports its own steps per second. Writes multi_gpu_demo.json
and multi_gpu_demo.md to --out. About a minute of GPU time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tally.daemon.cli import clients_by_pid

BE_LOOP = """
import sys, time, torch
x = torch.randn(4096, 4096, device="cuda")
w = torch.randn(4096, 4096, device="cuda", requires_grad=True)
opt = torch.optim.SGD([w], lr=1e-6)
end, steps = time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    opt.zero_grad(); (x @ w).square().mean().backward(); opt.step(); torch.cuda.synchronize(); steps += 1
print(f"STEPS_PER_S {steps / float(sys.argv[1]):.3f}")
"""

HP_LOOP = """
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
print("HP_DONE")
"""


def tally(*args: str, env: dict, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally", *args], env=env, check=check, text=True,
                          capture_output=capture, timeout=120)


def steps_per_s(output: str) -> float | None:
    for line in output.splitlines():
        if line.startswith("STEPS_PER_S "):
            return float(line.split()[1])
    return None


def summarize(runs: dict[str, dict]) -> dict:
    """Compares each run's BE throughput with the alone run and says whether the expectation held."""
    alone = runs.get("alone", {}).get("steps_per_s")
    out = {}
    for name, run in runs.items():
        rate = run.get("steps_per_s")
        out[name] = {"steps_per_s": rate, "vs_alone": rate / alone if rate and alone else None,
                     "be_held_ms": run.get("be", {}).get("held_ms"), "be_gpu": run.get("be", {}).get("gpu_index")}
    other, same = out.get("other-gpu", {}), out.get("same-gpu", {})
    out["independent"] = bool(other.get("be_held_ms") == 0 and other.get("vs_alone") and other["vs_alone"] > 0.9
                              and (same.get("be_held_ms") or 0) > 0)
    return out


class Poller:
    """Samples `tally status --json` in the background; keeps each pid's latest client record."""

    def __init__(self, env: dict):
        self.env, self.latest, self.samples = env, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            proc = tally("status", "--json", env=self.env, check=False)
            if proc.returncode == 0:
                try:
                    self.latest.update(clients_by_pid(json.loads(proc.stdout)))
                    self.samples += 1
                except ValueError:
                    pass
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def run_case(env: dict, be_gpu: str, hp_gpu: str | None, seconds: float) -> dict:
    hp = None
    if hp_gpu is not None:
        hp = subprocess.Popen([sys.executable, "-m", "tally", "run", "--priority", "high", "--", sys.executable,
                               "-c", HP_LOOP, str(seconds + 15)], env={**env, "CUDA_VISIBLE_DEVICES": hp_gpu},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(8)  # HP has started launching
    poller = Poller(env)
    try:
        be = subprocess.run([sys.executable, "-m", "tally", "run", "--priority", "best-effort", "--", sys.executable,
                             "-c", BE_LOOP, str(seconds)], env={**env, "CUDA_VISIBLE_DEVICES": be_gpu},
                            capture_output=True, text=True, timeout=seconds + 120)
    finally:
        poller.stop()
        if hp is not None:
            hp.kill()
            hp.wait()
    clients = poller.latest
    be_client = next((c for c in clients.values() if c.get("priority") == "best-effort"), {})
    hp_client = next((c for c in clients.values() if c.get("priority") == "high"), {})
    return {"be_gpu_env": be_gpu, "hp_gpu_env": hp_gpu, "steps_per_s": steps_per_s(be.stdout),
            "be_rc": be.returncode, "be_stderr": be.stderr[-2000:], "status_samples": poller.samples,
            "be": be_client, "hp": hp_client}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    smi = shutil.which("nvidia-smi")
    gpus = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.splitlines() if smi else []
    if len(gpus) < 2:
        print(f"multi_gpu_demo: needs at least 2 GPUs, found {len(gpus)}", file=sys.stderr)
        return 2
    runtime = tempfile.mkdtemp(prefix="tmg-", dir="/tmp")
    env = {**os.environ, "TALLY_RUNTIME_DIR": runtime}
    doc: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "gpus": gpus, "runs": {}}
    try:
        tally("up", "--metrics-port", "0", env=env)
        doc["status_up"] = json.loads(tally("status", "--json", env=env).stdout)
        for name, be_gpu, hp_gpu in (("alone", "1", None), ("other-gpu", "1", "0"), ("same-gpu", "0", "0")):
            print(f"multi_gpu_demo: {name}", flush=True)
            doc["runs"][name] = run_case(env, be_gpu, hp_gpu, args.seconds)
    finally:
        tally("down", "--force", env=env, check=False)
        shutil.rmtree(runtime, ignore_errors=True)
    doc["summary"] = summarize(doc["runs"])
    boards = [(g.get("index"), g.get("uuid"), g.get("scoreboard")) for g in doc["status_up"].get("gpus", [])]
    (args.out / "multi_gpu_demo.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Several GPUs: one scoreboard per GPU", "", f"{doc['date']}; GPUs: {'; '.join(gpus)}", "",
             "Scoreboards: " + "; ".join(f"GPU {i} {u}: {s}" for i, u, s in boards), "",
             "| run | BE on | HP on | BE steps/s | vs alone | BE held ms |", "|---|---|---|---|---|---|"]
    for name, run in doc["runs"].items():
        s = doc["summary"][name]
        vs = f"{s['vs_alone']:.2f}" if s["vs_alone"] else "-"
        lines.append(f"| {name} | {run['be_gpu_env']} | {run['hp_gpu_env'] or '-'} | {s['steps_per_s']} | {vs} "
                     f"| {s['be_held_ms']} |")
    lines += ["", f"Clients on different GPUs independent: **{doc['summary']['independent']}**", ""]
    (args.out / "multi_gpu_demo.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if doc["summary"]["independent"] else 1


if __name__ == "__main__":
    sys.exit(main())
