"""Aggregate the run JSONs of an output directory into report.md, summary.json
and PNG charts (matplotlib, Agg backend: no display needed).

Every system appears for every (HP, BE, load) it was planned for: runs that
could not happen are listed as "not run: <reason>" (unavailable systems) or
"failed: <reason>"; their numbers are never filled in.

combine_runs / combined_markdown summarize several output dirs of one matrix
(repeated runs) as medians and ranges, naming every run that is not ok.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from tally.bench.systems import SYSTEM_NAMES
from tally.errors import TallyError


def load_runs(out_dir: Path) -> list[dict]:
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        raise TallyError(f"{out_dir} has no runs/ directory: nothing to report")
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise TallyError(f"run file {path} is not valid JSON: {exc}") from None
    if not runs:
        raise TallyError(f"{runs_dir} holds no run results: nothing to report")
    return runs


def _system_order(name: str) -> int:
    return SYSTEM_NAMES.index(name) if name in SYSTEM_NAMES else len(SYSTEM_NAMES)


def _pair_label(run: dict) -> str:
    key = run["key"]
    return f"{key['hp']} + {key['be']}"


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * 100:+.1f}%"


def _alone_share(run: dict) -> str:
    """Share of BE launches the tally gate admitted alone (estimate over the budget); '-' elsewhere."""
    share = ((run.get("scheduler") or {}).get("be") or {}).get("be_alone_share")
    return "-" if share is None else f"{share * 100:.1f}"


def _sliced_in_window(run: dict) -> str:
    """Share of BE launches in the measured window that ran as slices (scoreboard counters), for
    runs whose BE agent had a block-level plan; '-' elsewhere."""
    if not isinstance(run.get("blocksched"), dict):
        return "-"
    be = (run.get("scheduler") or {}).get("be") or {}
    launches, sliced = be.get("launches"), be.get("sliced_launches")
    if not isinstance(launches, (int, float)) or not isinstance(sliced, (int, float)) or launches <= 0:
        return "-"
    return f"{sliced / launches * 100:.1f}"


def _sliced(run: dict) -> str:
    """BE transformed fraction (% of the gated BE launches' estimated time run as slices) and the
    sliced launch count, from the BE agent's "blocksched" stats; '-' without them."""
    block = run.get("blocksched")
    if not isinstance(block, dict):
        return "-"
    fraction = block.get("transformed_fraction")
    share = "-" if fraction is None else f"{fraction * 100:.1f}"
    return f"{share} ({block.get('sliced_launches', 0)})"


def _status_word(run: dict) -> str:
    return "not run" if run.get("status") == "unavailable" else run.get("status", "failed")


def markdown_table(runs: list[dict]) -> str:
    header = ("| HP | BE | load | system | HP p50 ms | HP p90 ms | HP p99 ms | HP max ms | p99 overhead "
              "| service p99 ms | HP norm. | BE norm. | system tput | GPU util % | BE alone % "
              "| BE sliced launches % (window) | BE sliced % (launches) | status |")
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    ordered = sorted(runs, key=lambda r: (r["key"]["hp"], r["key"]["be"], r["key"]["load"],
                                          _system_order(r["key"]["system"])))
    for run in ordered:
        key = run["key"]
        cells = [key["hp"], key["be"], f"{key['load']:g}", key["system"]]
        if run.get("status") == "ok":
            lat, svc = run["hp"]["latency"], run["hp"]["service"]
            status = "ok"
            if run["hp"].get("incomplete"):
                status = f"ok ({run['hp']['incomplete']} requests not served)"
            cells += [_fmt(lat["p50_ms"]), _fmt(lat["p90_ms"]), _fmt(lat["p99_ms"]), _fmt(lat["max_ms"]),
                      "(reference)" if key["system"] == "standalone" else _pct(run.get("p99_overhead")),
                      _fmt(svc["p99_ms"]), _fmt(run.get("hp_normalized")), _fmt(run.get("be_normalized")),
                      _fmt(run.get("system_throughput")), _fmt(run.get("gpu_util_percent"), ".0f"),
                      _alone_share(run), _sliced_in_window(run), _sliced(run), status]
        else:
            reason = str(run.get("reason", "")).replace("|", "/")
            cells += ["-"] * (header.count("|") - 2 - len(cells)) + [f"{_status_word(run)}: {reason}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_block(out_dir: Path, runs: list[dict]) -> str:
    env = {}
    env_path = Path(out_dir) / "environment.json"
    if env_path.exists():
        try:
            env = json.loads(env_path.read_text())
        except ValueError:
            env = {}
    versions: dict[str, str] = {}
    workloads: dict[str, dict] = {}
    for run in runs:
        for role in ("hp", "be"):
            info = run.get("info", {}).get(role, {})
            for name in ("torch", "cuda", "cudnn", "device"):
                if info.get(name):
                    versions.setdefault(name, str(info[name]))
            spec = run.get("workloads", {}).get(role)
            if spec:
                workloads.setdefault(spec.get("ref", spec.get("name", "?")), spec)
    lines = ["| | |", "|---|---|"]
    for label, value in [("date", env.get("date")), ("host", env.get("host")), ("GPU", env.get("gpu")),
                         ("driver", env.get("driver")), ("GPU memory", env.get("gpu_memory")),
                         ("python", env.get("python")), ("torch", versions.get("torch")),
                         ("CUDA (torch)", versions.get("cuda")), ("cuDNN", versions.get("cudnn")),
                         ("device (worker)", versions.get("device"))]:
        if value:
            lines.append(f"| {label} | {value} |")
    lines += ["", "| workload | kind | batch | precision | variant | details |", "|---|---|---|---|---|---|"]
    for ref, spec in sorted(workloads.items()):
        details = ", ".join(f"{k}={v}" for k, v in (spec.get("details") or {}).items())
        lines.append(f"| {ref} | {spec.get('kind', '?')} | {spec.get('batch_size', '?')} | "
                     f"{spec.get('precision', '?')} | {spec.get('variant', '?')} | {details} |")
    return "\n".join(lines)


def _grouped(runs: list[dict], metric: str) -> tuple[list[str], list[str], dict]:
    """pairs (x axis), systems (bars), values[(pair, system)] for ok runs at each pair's main load."""
    values: dict = {}
    pairs: list[str] = []
    systems: set[str] = set()
    for run in runs:
        if run.get("status") != "ok":
            continue
        value = run.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        label = f"{_pair_label(run)}\n@{run['key']['load']:g}"
        if label not in pairs:
            pairs.append(label)
        systems.add(run["key"]["system"])
        values[(label, run["key"]["system"])] = value
    return sorted(pairs), sorted(systems, key=_system_order), values


def _bar_chart(path: Path, runs: list[dict], metric: str, ylabel: str, title: str, scale: float = 1.0,
               skip_systems: tuple[str, ...] = (), reference: float | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, systems, values = _grouped(runs, metric)
    systems = [s for s in systems if s not in skip_systems]
    if not pairs or not systems:
        return False
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(pairs) + 2), 4.5))
    for i, system in enumerate(systems):
        xs = [p + (i - (len(systems) - 1) / 2) * width for p in range(len(pairs))]
        ys = [values.get((pair, system), math.nan) * scale for pair in pairs]
        ax.bar(xs, ys, width, label=system)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels(pairs, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(systems)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cdf_charts(charts: Path, runs: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_pair: dict = defaultdict(list)
    for run in runs:
        if run.get("status") == "ok" and run.get("hp", {}).get("latencies_ms"):
            key = run["key"]
            by_pair[(key["hp"], key["be"], key["load"])].append(run)
    written = []
    for (hp, be, load), group in sorted(by_pair.items()):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for run in sorted(group, key=lambda r: _system_order(r["key"]["system"])):
            values = np.sort(np.asarray(run["hp"]["latencies_ms"], dtype=float))
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=run["key"]["system"])
        ax.set_xscale("log")
        ax.set_xlabel("HP latency, arrival to completion (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{hp} next to {be}, load {load:g}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = charts / f"cdf__{_safe(hp)}__{_safe(be)}__load{load:g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text)


def write_report(out_dir: str | Path) -> Path:
    """Write report.md, summary.json and charts/*.png for `out_dir`; return the report path."""
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    charts = out_dir / "charts"
    charts.mkdir(exist_ok=True)
    for old in charts.glob("*.png"):
        old.unlink()
    chart_files = []
    if _bar_chart(charts / "p99_overhead.png", runs, "p99_overhead", "HP p99 overhead (%)",
                  "HP p99 latency overhead vs standalone (lower is better)", scale=100.0,
                  skip_systems=("standalone",), reference=0.0):
        chart_files.append(charts / "p99_overhead.png")
    if _bar_chart(charts / "system_throughput.png", runs, "system_throughput", "HP norm. + BE norm.",
                  "System throughput (higher is better; 1.0 = one job alone)", skip_systems=("standalone",),
                  reference=1.0):
        chart_files.append(charts / "system_throughput.png")
    chart_files += _cdf_charts(charts, runs)

    counts = defaultdict(int)
    for run in runs:
        counts[run.get("status", "failed")] += 1
    lines = [
        f"# tally bench: {out_dir.name}",
        "",
        f"{len(runs)} runs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".",
        "Latency = arrival to completion (queueing included); service = start to completion. "
        "p99 overhead = p99 shared / p99 standalone - 1. HP/BE norm. = throughput / standalone throughput; "
        "system tput = HP norm. + BE norm. BE sliced launches % (window) = share of the BE program's "
        "launches in the measured window that ran as block-level slices (scoreboard counters). "
        "BE sliced % = share of the estimated GPU time of BE launches admitted "
        "under the turnaround budget (HP present, not idle past unthrottle) that ran as block-level slices "
        "(agent stats over the BE process's life; '-' without them), with the sliced launch count. "
        "Systems marked 'not run' were not measured: no numbers are shown for them.",
        "",
        "## Results",
        "",
        markdown_table(runs),
        "",
        "## Charts",
        "",
    ]
    lines += [f"![{p.stem}](charts/{p.name})" for p in chart_files] or ["(no successful runs to chart)"]
    lines += ["", "## Environment", "", environment_block(out_dir, runs), ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    summary = [{k: v for k, v in run.items() if k != "hp"} | (
        {"hp": {k: v for k, v in run["hp"].items() if k not in ("latencies_ms", "service_ms")}} if "hp" in run else {})
        for run in runs]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return report


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _dir_labels(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    # a dir's own name reads best; two experiments may both have e.g. "all-systems"
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def combine_runs(dirs) -> list[dict]:
    """One row per (HP, BE, load, system) found in any of `dirs` (output dirs of repeated runs
    of one matrix): `runs` holds one entry per dir, in dir order, with its status ("ok",
    "failed", "not run", ... or "absent" where that dir has no such run) and numbers; the
    medians are over the ok runs only."""
    dirs = [Path(d) for d in dirs]
    labels = _dir_labels(dirs)
    groups: dict = {}
    for index, directory in enumerate(dirs):
        if not directory.is_dir():
            raise TallyError(f"{directory} is not a directory")
        for run in load_runs(directory):
            key = run.get("key")
            if not isinstance(key, dict) or not {"hp", "be", "load", "system"} <= key.keys():
                raise TallyError(f"{directory}/runs holds a file that is not a tally bench run (no key)")
            group = groups.setdefault((key["hp"], key["be"], key["load"], key["system"]), [None] * len(dirs))
            if group[index] is not None:
                raise TallyError(f"{directory}/runs holds two runs of {key['hp']} + {key['be']} "
                                 f"under {key['system']} at load {key['load']:g}")
            group[index] = run
    rows = []
    for (hp, be, load, system), runs in sorted(groups.items(),
                                               key=lambda g: (*g[0][:3], _system_order(g[0][3]), g[0][3])):
        entries = []
        for label, run in zip(labels, runs):
            if run is None:
                entries.append({"dir": label, "status": "absent"})
            elif run.get("status") != "ok":
                entries.append({"dir": label, "status": _status_word(run), "reason": str(run.get("reason", ""))})
            else:
                entries.append({"dir": label, "status": "ok", "p99_overhead": _number(run.get("p99_overhead")),
                                "be_normalized": _number(run.get("be_normalized")),
                                "p99_ms": _number(((run.get("hp") or {}).get("latency") or {}).get("p99_ms"))})
        ok = [e for e in entries if e["status"] == "ok"]

        def median(name):
            values = [e[name] for e in ok if e[name] is not None]
            return statistics.median(values) if values else None

        rows.append({"hp": hp, "be": be, "load": load, "system": system, "runs": entries, "ok": len(ok),
                     "median_p99_overhead": median("p99_overhead"), "median_be_normalized": median("be_normalized"),
                     "median_p99_ms": median("p99_ms")})
    return rows


def _median_range(row: dict, name: str, show) -> str:
    values = [e[name] for e in row["runs"] if e["status"] == "ok" and e[name] is not None]
    if not values:
        return "-"
    text = show(row[f"median_{name}"])
    return text if len(values) == 1 else f"{text} [{show(min(values))}, {show(max(values))}]"


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _not_ok(row: dict) -> str:
    notes = []
    for entry in row["runs"]:
        if entry["status"] == "ok":
            continue
        note = f"{entry['dir']}: {entry['status']}"
        reason = " ".join(entry.get("reason", "").split()).replace("|", "/")
        if reason:
            note += f" ({reason[:77] + '...' if len(reason) > 80 else reason})"
        notes.append(note)
    return "; ".join(notes) or "-"


def combined_markdown(rows: list[dict]) -> str:
    """The table of combine_runs' rows, with a header naming the dirs in the per-run order."""
    labels = [e["dir"] for e in rows[0]["runs"]] if rows else []
    header = ("| HP | BE | load | system | ok runs | per run: p99 overhead / BE norm. "
              "| p99 overhead: median [min, max] | BE norm.: median [min, max] | not ok |")
    lines = [f"# tally bench: {len(labels)} output dirs combined", "",
             f"Per-run values in the order {', '.join(labels)}. Medians and ranges are over the ok runs "
             "(the mean of the two middle values for an even count); standalone rows give the reference "
             "HP p99 in ms. Runs that failed, were not run or are absent from a dir are named under "
             "\"not ok\" and left out of the medians.", "",
             header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for row in rows:
        cells = [row["hp"], row["be"], f"{row['load']:g}", row["system"], f"{row['ok']}/{len(row['runs'])}"]
        if row["system"] == "standalone":
            per_run = [_ms(e["p99_ms"]) if e["status"] == "ok" and e["p99_ms"] is not None else e["status"]
                       for e in row["runs"]]
            cells += [", ".join(per_run), "ref. p99 " + _median_range(row, "p99_ms", _ms), "-"]
        else:
            per_run = [f"{_pct(e['p99_overhead'])} / {_fmt(e['be_normalized'])}" if e["status"] == "ok"
                       else e["status"] for e in row["runs"]]
            cells += [", ".join(per_run), _median_range(row, "p99_overhead", _pct),
                      _median_range(row, "be_normalized", _fmt)]
        lines.append("| " + " | ".join(cells + [_not_ok(row)]) + " |")
    return "\n".join(lines) + "\n"
