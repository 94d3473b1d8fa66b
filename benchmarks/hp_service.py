"""HP service time by run, from `tally bench` output directories: what every request pays, apart
from queueing.

A p99 at 50% load is mostly queueing, and it magnifies a small change in service time (the
request's own start to completion). This prints, per run: the service mean and p10, the mean of
the requests that queued behind an earlier one (they start the moment it completes, while HP is
busy, so the gate keeps BE's new work away from them), and the service mean against the same
directory's standalone run. A shift in every request, the queued ones and the fastest included,
is not BE work arriving in HP's way; a difference in the first requests of busy periods only is.

    python3 benchmarks/hp_service.py DIR [DIR...]      (each a bench output dir with runs/)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from tally.bench.metrics import latency_summary  # the report's p99: the same run gives the same figure

QUEUED_MS = 0.05  # waited at least this long: an earlier request was still running at arrival


class BadRun(ValueError):
    """A run file that is not what `tally bench` writes."""


def _numbers(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def breakdown(run) -> dict | None:
    """Service figures of one run JSON; None when it has no per-request latencies (a run that
    failed, or one from before they were kept); BadRun for anything else out of place."""
    if not isinstance(run, dict) or not isinstance(run.get("key"), dict):
        raise BadRun("not a tally bench run (no key object)")
    hp = run.get("hp")
    if hp is None:
        return None
    if not isinstance(hp, dict):
        raise BadRun("hp is not an object")
    latencies, service = hp.get("latencies_ms"), hp.get("service_ms")
    if latencies is None or service is None:
        return None
    if not _numbers(latencies) or not _numbers(service) or len(latencies) != len(service):
        raise BadRun("latencies_ms and service_ms are not two lists of numbers of one length")
    if not service:
        return None
    queued = [s for lat, s in zip(latencies, service) if lat - s >= QUEUED_MS]
    key = run["key"]
    return {"hp": key.get("hp"), "load": key.get("load"), "system": key.get("system"), "be": key.get("be"),
            "requests": len(service), "service_mean_ms": statistics.mean(service),
            "service_p10_ms": float(np.percentile(service, 10)),  # interpolated, as tally.bench.metrics does
            "queued_service_mean_ms": statistics.mean(queued) if queued else None,
            "queued": len(queued), "p99_ms": latency_summary([x / 1e3 for x in latencies])["p99_ms"]}


def rows_of(directory: Path) -> list[dict]:
    """The directory's runs with per-request data, each against the standalone run of its HP
    workload and load (None without one). BadRun names a file that does not read."""
    rows = []
    for path in sorted((directory / "runs").glob("*.json")):
        try:
            row = breakdown(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise BadRun(f"{path}: {exc}") from None
        if row:
            rows.append(dict(row, dir=directory.name))
    reference = {(r["hp"], r["load"]): r["service_mean_ms"] for r in rows if r["system"] == "standalone"}
    for r in rows:
        ref = reference.get((r["hp"], r["load"]))
        r["service_vs_standalone"] = r["service_mean_ms"] / ref - 1 if ref else None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| dir | HP | load | BE | system | service mean ms | vs standalone | service p10 ms | queued: mean ms (n) "
             "| p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['service_vs_standalone']:+.1%}" if r["service_vs_standalone"] is not None else "-"
        queued = (f"{r['queued_service_mean_ms']:.3f} ({r['queued']})" if r["queued_service_mean_ms"] is not None
                  else "-")
        lines.append(f"| {r['dir']} | {r['hp']} | {r['load']} | {r['be']} | {r['system']} | "
                     f"{r['service_mean_ms']:.3f} | {vs} | {r['service_p10_ms']:.3f} | {queued} | {r['p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = []
    for d in args.dirs:
        if not (d / "runs").is_dir():
            print(f"hp_service: {d} has no runs/ directory", file=sys.stderr)
            return 2
        try:
            rows += rows_of(d)
        except BadRun as exc:
            print(f"hp_service: {exc}", file=sys.stderr)
            return 2
    if not rows:
        print("hp_service: no run in these directories has per-request latencies", file=sys.stderr)
        return 1
    sys.stdout.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
