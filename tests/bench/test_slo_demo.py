"""The CPU-side parts of benchmarks/slo_demo.py (the demo itself runs on a GPU)."""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load

slo_demo = load("slo_demo")
SCRIPT = Path(slo_demo.__file__)


def test_loads_and_phases():
    assert slo_demo.parse_loads("0.25, 0.75,0.25") == [0.25, 0.75, 0.25]
    for bad in ("0.25,x", "0.5,0", "-1", "nan"):
        with pytest.raises(ValueError):
            slo_demo.parse_loads(bad)
    phases = slo_demo.make_phases([0.25, 0.75, 0.25], 20.0)
    assert [(p.index, p.load, p.start_s, p.end_s) for p in phases] == [
        (0, 0.25, 0.0, 20.0), (1, 0.75, 20.0, 40.0), (2, 0.25, 40.0, 60.0)]
    assert slo_demo.phase_rates(phases, 0.01) == pytest.approx([25.0, 75.0, 25.0])


def test_load_step_arrivals_offer_each_phase_its_rate_and_are_deterministic():
    phases = slo_demo.make_phases([0.25, 0.75, 0.25], 20.0)
    service = 0.008  # 125 requests/s standalone
    offsets = slo_demo.load_step_arrivals(phases, service, seed=3)
    assert offsets == sorted(offsets)
    assert offsets == slo_demo.load_step_arrivals(phases, service, seed=3)
    assert offsets != slo_demo.load_step_arrivals(phases, service, seed=4)
    arr = np.asarray(offsets)
    assert arr.min() >= 0 and arr.max() < 60.0
    for phase, rate in zip(phases, slo_demo.phase_rates(phases, service)):
        inside = arr[(arr >= phase.start_s) & (arr < phase.end_s)]
        expected = rate * phase.duration_s
        assert abs(len(inside) - expected) <= 1, (phase, len(inside), expected)
        # Poisson: the gaps average 1 / rate; with ~600-1900 arrivals the mean is within ~10 %
        gaps = np.diff(inside)
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)
        assert np.std(gaps) / gaps.mean() == pytest.approx(1.0, abs=0.15)
    # the middle phase has three times the arrivals of the outer ones
    counts = [np.count_nonzero((arr >= p.start_s) & (arr < p.end_s)) for p in phases]
    assert counts[1] == pytest.approx(3 * counts[0], abs=3)
    # changing one phase's load leaves the other phases' arrivals alone
    other = np.asarray(slo_demo.load_step_arrivals(slo_demo.make_phases([0.25, 0.5, 0.25], 20.0), service, seed=3))
    assert np.array_equal(other[other < 20.0], arr[arr < 20.0])


def test_simulate_fifo_queues_in_arrival_order():
    lat = slo_demo.simulate_fifo([0.0, 0.1, 0.2], [0.05], seed=0)
    assert lat == pytest.approx([0.05, 0.05, 0.05])
    lat = slo_demo.simulate_fifo([0.0, 0.0, 0.0], [1.0], seed=0)
    assert lat == pytest.approx([1.0, 2.0, 3.0])
    lat = slo_demo.simulate_fifo([0.0, 0.5, 3.0], [1.0], seed=0)
    assert lat == pytest.approx([1.0, 1.5, 1.0])


def test_default_slo_rules():
    rng = np.random.default_rng(1)
    service = list(0.008 + rng.exponential(0.0005, size=400))
    phases = slo_demo.make_phases([0.25, 0.75, 0.25], 20.0)
    offsets = slo_demo.load_step_arrivals(phases, float(np.mean(service)), seed=0)
    slo_s, detail = slo_demo.default_slo_ms("service", phases, offsets, service, seed=0)
    assert slo_s == pytest.approx(1.5 * np.percentile(service, 99) * 1e3, abs=0.005)  # rounded to 0.01 ms
    slo_e, detail = slo_demo.default_slo_ms("e2e", phases, offsets, service, seed=0)
    per_phase = detail["standalone_p99_ms_per_phase"]
    # queueing at 0.75 dominates: the busiest phase sets the target, well above the service time
    assert per_phase[1] == max(per_phase) and per_phase[1] > 2 * per_phase[0]
    assert slo_e == pytest.approx(1.5 * per_phase[1], abs=0.005)
    assert slo_e > slo_s
    assert slo_demo.default_slo_ms("e2e", phases, offsets, service, seed=0)[0] == slo_e
    with pytest.raises(ValueError):
        slo_demo.default_slo_ms("bogus", phases, offsets, service, seed=0)


def test_window_p99_series_on_synthetic_requests():
    # window 0: 100 requests with latencies 1..100 ms, window 1 empty, window 2: one 7 ms request
    reqs = [[0.5 - ms / 1e3, 0.5 - ms / 2e3, 0.5] for ms in range(1, 101)] + [[2.3, 2.301, 2.307]]
    series = slo_demo.window_p99_series(reqs, "e2e", t_end=3.0)
    assert [w["count"] for w in series] == [100, 0, 1]
    assert series[0]["p99_ms"] == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert math.isnan(series[1]["p99_ms"])
    assert series[2]["p99_ms"] == pytest.approx(7.0)
    service = slo_demo.window_p99_series(reqs, "service", t_end=3.0)
    assert service[0]["p99_ms"] == pytest.approx(np.percentile(np.arange(1, 101) / 2, 99))
    assert service[2]["p99_ms"] == pytest.approx(6.0)
    # windows follow completion, not arrival
    late = slo_demo.window_p99_series([[0.2, 0.2, 1.5]], "e2e", t_end=2.0)
    assert [w["count"] for w in late] == [0, 1]


def test_throughput_series_counts_steps_per_window():
    steps = [0.1 * k for k in range(1, 31)]  # a step every 100 ms from 0 to 3 s
    series = slo_demo.throughput_series(steps, 0.0, t_end=3.0)
    assert [w["steps_per_s"] for w in series] == pytest.approx([10.0, 10.0, 10.0])
    # the step of (0.5, 1.5] spans the edge at 1 s: half of it counts on each side
    series = slo_demo.throughput_series([0.5, 1.5], 0.0, t_end=2.0)
    assert [w["steps_per_s"] for w in series] == pytest.approx([1.5, 0.5])
    assert [w["steps_per_s"] for w in slo_demo.throughput_series([], None, t_end=2.0)] == [0.0, 0.0]


def test_window_compliance_judges_stuck_windows_and_skips_idle_ones():
    # windows: 0 ok (5 ms), 1 violated (50 ms), 2-4 empty while the request of 2.05 s waits (stuck),
    # 5 violated (that request completes, 3.45 s late), 6 empty and idle (not judged)
    reqs = [[0.1, 0.1, 0.105], [1.1, 1.1, 1.15], [2.05, 2.05, 5.5]]
    judged, ok = slo_demo.window_compliance(reqs, [], "e2e", 20.0, 0.0, 7.0)
    assert (judged, ok) == (6, 1)
    # a request that arrived just before a window's end has not waited longer than the SLO yet
    judged, ok = slo_demo.window_compliance([[0.995, 0.995, 1.01]], [], "e2e", 20.0, 0.0, 2.0)
    assert (judged, ok) == (1, 1)
    # for service latency a queued-but-unserved request does not count, one in service does
    judged, ok = slo_demo.window_compliance([[0.1, 0.1, 0.105]], [0.5], "service", 20.0, 0.0, 2.0)
    assert (judged, ok) == (1, 1)
    judged, ok = slo_demo.window_compliance([[0.1, 0.1, 0.105]], [0.5], "e2e", 20.0, 0.0, 2.0)
    assert (judged, ok) == (2, 1)  # the never-served request of 0.5 s makes window 1 a violation


def test_phase_summaries_math():
    phases = slo_demo.make_phases([0.2, 0.6], 2.0)
    # phase 0: 10 requests of 4 ms; phase 1: 10 requests of 30 ms; the last arrival was never served
    reqs = [[0.1 + 0.18 * i, 0.1 + 0.18 * i + 0.001, 0.1 + 0.18 * i + 0.004] for i in range(10)]
    reqs += [[2.1 + 0.18 * i, 2.1 + 0.18 * i + 0.01, 2.1 + 0.18 * i + 0.03] for i in range(10)]
    offsets = [r[0] for r in reqs] + [3.99]
    steps = [0.25 * k for k in range(1, 9)] + [2.0 + 0.5 * k for k in range(1, 5)]  # 4/s, then 2/s
    samples = [{"t": t, "budget_us": 1000.0 if t < 2 else 250.0, "slo_state": "hold"} for t in np.arange(0, 4, 0.25)]
    rows = slo_demo.phase_summaries(reqs, offsets, steps, 0.0, samples, phases, slo_ms=20.0, kind="e2e")
    assert [r["phase"] for r in rows] == [0, 1, "all"]
    first, second, total = rows
    assert (first["offered"], first["completed"]) == (10, 10)
    assert (second["offered"], second["completed"]) == (11, 10)
    assert first["p50_ms"] == pytest.approx(4.0) and first["p99_ms"] == pytest.approx(4.0)
    assert second["p99_ms"] == pytest.approx(30.0) and second["service_p99_ms"] == pytest.approx(20.0)
    assert first["windows_ok_frac"] == 1.0 and (first["windows_judged"], first["windows_ok"]) == (2, 2)
    assert second["windows_ok"] == 0 and second["windows_judged"] == 2
    assert first["be_steps_per_s"] == pytest.approx(4.0) and second["be_steps_per_s"] == pytest.approx(2.0)
    assert first["budget_us_median"] == 1000.0 and second["budget_us_median"] == 250.0
    assert first["slo_states"] == {"hold": 8}
    assert total["offered"] == 21 and total["completed"] == 20 and total["load"] == pytest.approx(0.4)
    assert total["windows_judged"] == 4 and total["windows_ok_frac"] == 0.5
    assert total["be_steps_per_s"] == pytest.approx(3.0)
    # the same requests judged on service latency: phase 1's 20 ms meets a 21 ms SLO
    rows = slo_demo.phase_summaries(reqs, offsets, steps, 0.0, samples, phases, slo_ms=21.0, kind="service")
    assert rows[1]["windows_ok"] == 2


def test_status_sample_from_status_json():
    gpu = {"turnaround_budget_us": 400.0, "hp_active": 1, "be_active": 1,
           "slo": {"state": "decrease", "target_ms": 20.0, "p99_ms": 25.5},
           "clients": [{"priority": "high", "requests": 120, "held_ms": 0.0, "launches": 900},
                       {"priority": "best-effort", "requests": 0, "held_ms": 12.5, "launches": 300},
                       {"priority": "best-effort", "requests": 0, "held_ms": 1.5, "launches": 10}]}
    s = slo_demo.status_sample(3.25, gpu)
    assert s == {"t": 3.25, "budget_us": 400.0, "slo_state": "decrease", "slo_target_ms": 20.0,
                 "slo_p99_ms": 25.5, "hp_active": 1, "be_active": 1, "be_held_ms": 14.0, "be_launches": 310,
                 "hp_requests": 120}


def _synthetic_doc() -> dict:
    phases = slo_demo.make_phases([0.25, 0.75, 0.25], 3.0)
    rng = np.random.default_rng(0)
    offsets = slo_demo.load_step_arrivals(phases, 0.01, seed=0)
    doc = {"environment": {"date": "2026-01-01T00:00:00", "gpu": "NVIDIA H100 80GB HBM3", "driver": "550.1",
                           "torch": "2.5.0"},
           "parameters": {"hp": "bert-infer@graph", "be": "resnet50-train", "phase_s": 3.0,
                          "loads": [0.25, 0.75, 0.25], "phases": [p.__dict__ for p in phases], "seed": 0,
                          "slo_p99_ms": 30.0, "slo_latency": "e2e", "slo_rule": "given", "modes": ["slo", "noslo"]},
           "capacity": {"capacity_rps": 100.0, "service_time_s": 0.01, "p99_s": 0.012},
           "modes": {}}
    for mode, extra in (("slo", 0.005), ("noslo", 0.03)):
        reqs = [[a, a, a + 0.01 + rng.exponential(extra)] for a in offsets]
        steps = list(np.cumsum(rng.uniform(0.1, 0.3, size=60)))
        status = [(t, {"turnaround_budget_us": 1000.0 / (1 + t) if mode == "slo" else 1000.0,
                       "slo": {"state": "hold" if mode == "slo" else "off", "target_ms": 30.0, "p99_ms": 20.0},
                       "clients": []}) for t in np.arange(0, 9, 0.25)]
        raw = {"mode": mode, "go_time": 0.0, "errors": [], "hp": {"requests": reqs},
               "be": {"step_end_times": steps, "measure_start_time": 0.0}, "status": status}
        doc["modes"][mode] = slo_demo.analyze_mode(raw, phases, offsets, 30.0, "e2e")
    return slo_demo.clean_json(doc)


def test_analyze_and_render_markdown():
    doc = _synthetic_doc()
    json.dumps(doc, allow_nan=False)  # strict JSON: NaN became null
    slo = doc["modes"]["slo"]
    assert [r["phase"] for r in slo["phases"]] == [0, 1, 2, "all"]
    assert len(slo["series"]["latency"]) == 9 and len(slo["series"]["be"]) == 9
    assert slo["incomplete"] == 0
    text = slo_demo.render_markdown(doc)
    assert "![HP p99 latency, BE budget and BE throughput over time](slo_demo.png)" in text
    assert text.count("| phase | load |") == 2 and "## slo" in text and "## noslo" in text
    row = slo["phases"][1]
    assert (f"| 1 | 0.75 | {row['offered_rps']:.1f} | {row['completed']}/{row['offered']} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |") in text
    assert "SLO: p99 e2e latency <= 30.00 ms" in text
    doc["modes"]["noslo"] = {"mode": "noslo", "errors": ["the BE trainer exited"]}
    text = slo_demo.render_markdown(doc)
    assert "**error:** the BE trainer exited" in text and "no measurements" in text


def test_chart_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = slo_demo.plot_chart(_synthetic_doc(), tmp_path / "slo_demo.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_help_works_without_a_gpu():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--slo-p99-ms" in proc.stdout and "--phase-s" in proc.stdout


def test_bad_arguments_are_refused():
    for argv in (["--out", "x", "--modes", "slo,bogus"], ["--out", "x", "--loads", "0.5,-1"],
                 ["--out", "x", "--slo-p99-ms", "0"]):
        with pytest.raises(SystemExit):
            slo_demo.parse_args(argv)


def test_server_measures_capacity_and_replays_the_arrivals(tmp_path):
    phases = slo_demo.make_phases([0.2, 0.5], 0.5)
    offsets = slo_demo.load_step_arrivals(phases, 0.005, seed=0)
    from tally.bench.traces import Arrivals

    Arrivals(offsets_s=offsets, duration_s=1.0, load=0.35, service_time_s=0.005, source="test").write(
        tmp_path / slo_demo.ARRIVALS_FILE)
    (tmp_path / slo_demo.GO_FILE).write_text("{}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--serve", "--workload", "fake-infer", "--dir", str(tmp_path),
                           "--measure-capacity", "--capacity-s", "0.2", "--warmup-s", "0", "--warmup-steps", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    capacity = json.loads((tmp_path / slo_demo.CAPACITY_FILE).read_text())
    summary = slo_demo.service_summary(capacity["service_s"])
    assert summary["requests"] >= 20 and summary["service_time_s"] == pytest.approx(0.005, rel=0.5)
    result = json.loads((tmp_path / slo_demo.HP_RESULT_FILE).read_text())
    assert result["error"] is None and result["offered"] == len(offsets) == len(result["requests"])
    go = result["go_time"]
    for (due, start, end), offset in zip(result["requests"], offsets):
        assert due == pytest.approx(go + offset, abs=1e-6) and due <= start + 1e-4 and end > start


FAKE_TALLY = """
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps([sys.argv[1:], os.environ.get("TALLY_RUNTIME_DIR")]) + "\\n")
verb = sys.argv[1]
if verb == "run":
    command = sys.argv[sys.argv.index("--") + 1:]
    os.execvp(command[0], command)
if verb == "status":
    print(json.dumps({{"gpus": [{{"index": 0, "turnaround_budget_us": 500.0, "hp_active": 1, "be_active": 1,
                                "slo": {{"state": "hold", "target_ms": 1.0, "p99_ms": 0.5}}, "clients": []}}]}}))
sys.exit(0)
"""


def test_the_whole_demo_with_fake_workloads_and_a_fake_tally(tmp_path):
    log = tmp_path / "calls"
    fake = tmp_path / "fake_tally.py"
    fake.write_text(textwrap.dedent(FAKE_TALLY.format(log=str(log))))
    out = tmp_path / "out"
    code = slo_demo.main(["--out", str(out), "--hp", "fake-infer", "--be", "fake-train", "--phase-s", "1",
                          "--loads", "0.2,0.5", "--capacity-s", "0.3", "--warmup-s", "0",
                          "--tally-cmd", f"{sys.executable} {fake}"])
    assert code == 0
    doc = json.loads((out / "slo_demo.json").read_text())
    assert (out / "slo_demo.md").exists() and (out / "slo_demo.png").read_bytes()[:4] == b"\x89PNG"
    slo_ms = doc["parameters"]["slo_p99_ms"]
    assert slo_ms > 0 and doc["capacity"]["requests"] >= 20
    for mode in ("slo", "noslo"):
        data = doc["modes"][mode]
        assert data["errors"] == [] and data["incomplete"] == 0
        assert len(data["requests"]) == sum(r["offered"] for r in data["phases"][:-1])
        assert data["phases"][-1]["be_steps_per_s"] > 0 and data["status_samples"]
        assert data["status_source"] == "tally status --json"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    runs = [argv for argv, _ in calls if argv[0] == "run"]
    # the first mode is slo without a target: capacity in a server of its own, then the SLO server
    assert "--capacity-only" in runs[0] and "--slo-p99-ms" not in runs[0]
    hp_runs = [argv for argv in runs if "--serve" in argv and "--capacity-only" not in argv]
    assert hp_runs[0][hp_runs[0].index("--slo-p99-ms") + 1] == f"{slo_ms:g}"
    assert "--slo-p99-ms" not in hp_runs[1]
    verbs = [argv[0] for argv, _ in calls if argv[0] in ("up", "down")]
    assert verbs == ["up", "down", "up", "down"]
    # each mode's daemon got its own short runtime dir, removed afterwards
    dirs = {env for argv, env in calls if argv[0] == "up"}
    assert len(dirs) == 2 and all(d.startswith("/tmp/tslo-") and not Path(d).exists() for d in dirs)


def test_status_poller_reads_the_scoreboard_that_status_names(tmp_path):
    from tally import scoreboard as sbmod
    from tally.slo import Reporter

    path = tmp_path / "sb"
    log = tmp_path / "calls"
    fake = tmp_path / "fake_tally.py"
    fake.write_text(textwrap.dedent(f"""
        import json, sys
        open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
        print(json.dumps({{"gpus": [{{"index": 0, "scoreboard": {str(path)!r}}}]}}))
    """))
    params = sbmod.PolicyParams(policy=sbmod.POLICY_TALLY, turnaround_budget_ns=750_000)
    with sbmod.Scoreboard.create(path, "GPU-slo-demo", params) as board:
        hp = board.claim_slot(101, sbmod.PRIORITY_HIGH, "server", slo_p99_ns=20_000_000)
        board.claim_slot(102, sbmod.PRIORITY_BEST_EFFORT, "trainer")
        for _ in range(7):
            Reporter.for_scoreboard(board, hp).report_ns(5_000_000)
        board.slo_state = sbmod.SLO_STATE_DECREASE
        board.slo_target_ns = 20_000_000
        board.slo_p99_ns = 25_000_000
        poller = slo_demo.StatusPoller([sys.executable, str(fake)], {}, interval_s=0.02)
        poller.start()
        try:
            deadline = slo_demo.now() + 10
            while len(poller.samples) < 3 and slo_demo.now() < deadline:
                slo_demo.time.sleep(0.01)
        finally:
            poller.stop()
    assert poller.source == "scoreboard" and log.read_text().splitlines() == ["status --json"]
    t, gpu = poller.samples[-1]
    sample = slo_demo.status_sample(0.0, gpu)
    assert sample["budget_us"] == 750.0 and sample["slo_state"] == "decrease"
    assert (sample["slo_target_ms"], sample["slo_p99_ms"]) == (20.0, 25.0)
    assert sample["hp_requests"] == 7 and sample["be_launches"] == 0
