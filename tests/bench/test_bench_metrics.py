"""Metric math: percentiles, windows, overheads, normalized and system throughput."""
from __future__ import annotations

import math

import pytest

from tally.bench import metrics


def test_latency_summary_percentiles_in_ms():
    summary = metrics.latency_summary([x / 1e3 for x in range(1, 101)])  # 1..100 ms
    assert summary["count"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p90_ms"] == pytest.approx(90.1)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["max_ms"] == pytest.approx(100.0)
    assert summary["mean_ms"] == pytest.approx(50.5)


def test_empty_latencies_are_nan_not_zero():
    summary = metrics.latency_summary([])
    assert summary["count"] == 0 and math.isnan(summary["p99_ms"])


def test_end_to_end_includes_queueing_service_does_not():
    # request 2 arrives at 1.0 while request 1 is served until 1.5
    requests = [(0.9, 0.9, 1.5), (1.0, 1.5, 2.0)]
    e2e, service = metrics.hp_request_latencies(requests)
    assert e2e.tolist() == pytest.approx([0.6, 1.0])
    assert service.tolist() == pytest.approx([0.6, 0.5])
    assert metrics.measurement_window(requests) == (0.9, 2.0)


def test_rate_in_window_counts_partial_steps():
    ends = [0.1 * i for i in range(1, 11)]  # 10 steps/s from t=0
    assert metrics.rate_in_window(ends, 0.0, (0.25, 0.75)) == pytest.approx(10.0)
    assert metrics.rate_in_window(ends, 0.0, (0.0, 1.0)) == pytest.approx(10.0)
    # a window past the last step: only the overlap counts
    assert metrics.rate_in_window(ends, 0.0, (0.5, 1.5)) == pytest.approx(5.0)
    assert metrics.rate_in_window([], 0.0, (0.0, 1.0)) == 0.0
    with pytest.raises(ValueError):
        metrics.rate_in_window(ends, 0.0, (1.0, 1.0))


def test_overhead_normalized_system_throughput():
    assert metrics.overhead(12.0, 10.0) == pytest.approx(0.2)
    assert metrics.overhead(9.0, 10.0) == pytest.approx(-0.1)
    assert math.isnan(metrics.overhead(12.0, 0.0))
    assert metrics.normalized(45.0, 90.0) == pytest.approx(0.5)
    assert math.isnan(metrics.normalized(1.0, 0.0))
    assert metrics.system_throughput(0.98, 0.6) == pytest.approx(1.58)


def test_hp_summary_counts_incomplete_requests():
    result = {"offered": 4, "requests": [(0.0, 0.0, 0.5), (0.5, 0.5, 1.0), (0.6, 1.0, 2.0)]}
    summary = metrics.hp_summary(result)
    assert summary["completed"] == 3 and summary["incomplete"] == 1
    assert summary["throughput_rps"] == pytest.approx(1.5)
    assert summary["latency"]["max_ms"] == pytest.approx(1400.0)


def test_be_rate_defaults_to_its_measured_run():
    result = {"measure_start_time": 10.0, "step_end_times": [10.5, 11.0, 11.5, 12.0]}
    assert metrics.be_rate(result) == pytest.approx(2.0)
    assert metrics.be_rate(result, (11.0, 12.0)) == pytest.approx(2.0)
    assert metrics.be_rate({"step_end_times": []}) == 0.0


def test_mean_utilization_uses_samples_inside_window_only():
    samples = [(0.0, 0.0), (1.0, 50.0), (2.0, 100.0), (3.0, 0.0)]
    assert metrics.mean_utilization(samples, (0.5, 2.5)) == pytest.approx(75.0)
    assert math.isnan(metrics.mean_utilization(samples, (5.0, 6.0)))
    assert math.isnan(metrics.mean_utilization([], (0.0, 1.0)))


def test_scheduler_delta_is_the_change_over_the_window_per_role():
    before = {10: {"pid": 10, "launches": 100, "held_ms": 5.0, "long_kernels": 1, "held_launches": 3},
              20: {"pid": 20, "launches": 7, "graph_launches": 2}}
    after = {10: {"pid": 10, "launches": 300, "held_ms": 9.5, "long_kernels": 21, "held_launches": 40,
                  "failopen": False},
             20: {"pid": 20, "launches": 9, "graph_launches": 12}}
    delta = metrics.scheduler_delta(before, after, {"be": 10, "hp": 20})
    assert delta["be"]["launches"] == 200 and delta["be"]["held_ms"] == 4.5
    assert delta["be"]["long_kernels"] == 20 and delta["be"]["held_launches"] == 37
    assert delta["be"]["be_alone_share"] == 20 / 200
    assert delta["hp"]["graph_launches"] == 10 and "be_alone_share" not in delta["hp"]


def test_scheduler_delta_needs_both_snapshots_and_skips_unknown_processes():
    assert metrics.scheduler_delta(None, {1: {}}, {"be": 1}) is None
    assert metrics.scheduler_delta({1: {"launches": 1}}, {}, {"be": 1}) is None
    # a process that joined during the window counts from zero
    delta = metrics.scheduler_delta({1: {"launches": 1}}, {2: {"launches": 5}}, {"be": 2, "hp": 3})
    assert delta == {"be": {"launches": 5, "failopen": False, "be_alone_share": 0.0}}


def test_gpu_state_averages_clock_and_power_inside_the_window_ignoring_gaps():
    samples = [(0.5, 10, 1000, 100), (1.0, 50, 1980, 300), (2.0, 60, 1700, math.nan), (3.5, 70, 1200, 500)]
    state = metrics.gpu_state(samples, (1.0, 3.0))
    assert state["sm_clock_mhz"] == pytest.approx(1840) and state["power_w"] == pytest.approx(300)
    assert metrics.mean_utilization(samples, (1.0, 3.0)) == pytest.approx(55)
    # samples of the old two-column form: utilization only
    assert math.isnan(metrics.gpu_state([(1.0, 50)], (0, 2))["sm_clock_mhz"])
