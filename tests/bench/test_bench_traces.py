"""Arrival traces: Azure CSV parsing (good and malformed), compression to a target load, generators."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.bench import traces
from tally.errors import TallyError

GOOD_CSV = """app,func,end_timestamp,duration
a1,f1,10.5,0.5
a1,f1,11.0,1.0
a1,f1,12.25,0.25
a2,f2,3.0,1.0
a1,f1,15.0,0.0
"""


def write(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_arrival_is_end_minus_duration_and_busiest_is_default(tmp_path):
    trace = traces.load_azure_csv(write(tmp_path, GOOD_CSV))
    key, arrivals = trace.function_arrivals(None)
    assert key == "a1/f1"
    assert arrivals.tolist() == [10.0, 10.0, 12.0, 15.0]
    assert trace.function_arrivals("f2")[1].tolist() == [2.0]  # bare func name, unique
    assert trace.function_arrivals("a2/f2")[0] == "a2/f2"


def test_azure_columns_in_any_order_and_blank_lines(tmp_path):
    text = "duration,end_timestamp,func,app\n1.0,5.0,f,a\n\n0.5,6.5,f,a\n"
    trace = traces.load_azure_csv(write(tmp_path, text))
    assert trace.function_arrivals("a/f")[1].tolist() == [4.0, 6.0]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "is empty"),
        ("app,func,end_timestamp,duration\n", "no invocations"),
        ("app,func,end_timestamp\na,f,1.0\n", "lacks column(s) duration"),
        ("app,function,end,duration\n", "lacks column(s) func, end_timestamp"),
        ("app,func,end_timestamp,duration\na,f,1.0,abc\n", "line 2: duration 'abc' is not a number"),
        ("app,func,end_timestamp,duration\na,f,nan,1\n", "is not finite"),
        ("app,func,end_timestamp,duration\na,f,1.0,-2\n", "negative duration"),
        ("app,func,end_timestamp,duration\na,f\n", "expected 4 fields, got 2"),
    ],
)
def test_malformed_azure_files_give_one_line_errors(tmp_path, text, fragment):
    with pytest.raises(TallyError) as info:
        traces.load_azure_csv(write(tmp_path, text))
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_file_and_unknown_function(tmp_path):
    with pytest.raises(TallyError, match="cannot read trace file"):
        traces.load_azure_csv(tmp_path / "absent.csv")
    trace = traces.load_azure_csv(write(tmp_path, GOOD_CSV))
    with pytest.raises(TallyError, match="'nope' not found .* the busiest is 'a1/f1'"):
        trace.function_arrivals("nope")


def test_window_selection_and_too_small_window(tmp_path):
    trace = traces.load_azure_csv(write(tmp_path, GOOD_CSV))
    _, arrivals = trace.function_arrivals("a1/f1")
    offsets, start, length = traces.select_window(arrivals, 10.0, 3.0)
    assert offsets.tolist() == [0.0, 0.0, 2.0] and start == 10.0 and length == 3.0
    with pytest.raises(TallyError, match="holds 1 invocation"):
        traces.select_window(arrivals, 14.0, 5.0)


def test_azure_arrivals_hit_target_count_inside_duration(tmp_path):
    trace = traces.load_azure_csv(write(tmp_path, GOOD_CSV))
    arrivals = traces.make_arrivals("azure", 0.5, 0.01, 10.0, seed=3, trace=trace)
    assert len(arrivals.offsets_s) == 500
    assert all(0 <= x < 10.0 for x in arrivals.offsets_s)
    assert arrivals.offsets_s == sorted(arrivals.offsets_s)
    assert arrivals.details["function"] == "a1/f1"


def test_fit_shape_keeps_the_rate_profile():
    # all of the shape's traffic in the first fifth of its window: thinning or
    # superposing must keep most arrivals in the first fifth of the run
    rng = np.random.default_rng(0)
    shape = np.sort(rng.uniform(0, 20, size=2000))
    thinned = traces.fit_shape(shape, 100.0, 300, 10.0, seed=1)
    assert len(thinned) == 300 and (thinned < 2.0).mean() == 1.0
    superposed = traces.fit_shape(shape[:50], 100.0, 300, 10.0, seed=1)
    assert len(superposed) == 300


@settings(max_examples=60, deadline=None)
@given(
    load=st.sampled_from([0.25, 0.5, 0.75]),
    service_ms=st.floats(1.0, 200.0),
    duration=st.floats(5.0, 120.0),
    source=st.sampled_from(["poisson", "bursty", "azure"]),
    shape_size=st.integers(2, 3000),
    seed=st.integers(0, 2**16),
)
def test_compression_mean_rate_matches_target(load, service_ms, duration, source, shape_size, seed):
    service = service_ms / 1e3
    trace = None
    if source == "azure":
        rng = np.random.default_rng(seed)
        arrivals = np.sort(rng.exponential(1.0, size=shape_size).cumsum())
        trace = traces.AzureTrace("mem", {"a/f": arrivals})
    result = traces.make_arrivals(source, load, service, duration, seed=seed, trace=trace)
    target_rate = load / service
    rate = len(result.offsets_s) / duration
    # the count is rounded to an integer: at most half a request off over the whole run
    assert abs(rate - target_rate) <= 0.5 / duration + 1e-9
    assert min(result.offsets_s) >= 0 and max(result.offsets_s) < duration


def test_poisson_is_seeded_and_has_unit_cv():
    a = traces.poisson_arrivals(20000, 100.0, seed=7)
    assert np.array_equal(a, traces.poisson_arrivals(20000, 100.0, seed=7))
    assert not np.array_equal(a, traces.poisson_arrivals(20000, 100.0, seed=8))
    assert 0.95 < traces.coefficient_of_variation(a) < 1.05
    # uniform over the window: each tenth holds ~10% of arrivals
    counts = np.histogram(a, bins=10, range=(0, 100))[0] / len(a)
    assert np.all(np.abs(counts - 0.1) < 0.01)


def test_bursty_is_burstier_than_poisson_and_seeded():
    a = traces.bursty_arrivals(20000, 100.0, seed=7)
    assert np.array_equal(a, traces.bursty_arrivals(20000, 100.0, seed=7))
    assert len(a) == 20000
    assert traces.coefficient_of_variation(a) > 1.08  # Poisson: 1 +- 0.01 at this size
    # rate per second varies far more than Poisson's sqrt(n) noise
    per_second = np.histogram(a, bins=100, range=(0, 100))[0]
    assert per_second.std() > 3 * np.sqrt(per_second.mean())


def test_target_count_validation():
    assert traces.target_count(0.5, 0.01, 10) == 500
    assert traces.target_count(0.25, 10.0, 1.0) == 1  # at least one request
    for bad in [(0, 0.01, 10), (0.5, 0, 10), (0.5, 0.01, 0)]:
        with pytest.raises(TallyError):
            traces.target_count(*bad)


def test_arrivals_file_round_trip_and_bad_file(tmp_path):
    arrivals = traces.make_arrivals("poisson", 0.5, 0.02, 4.0, seed=1)
    arrivals.write(tmp_path / "a.json")
    back = traces.Arrivals.read(tmp_path / "a.json")
    assert back.offsets_s == pytest.approx(arrivals.offsets_s, abs=1e-6)
    assert back.load == 0.5 and back.source == "poisson"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TallyError, match="cannot read arrivals file"):
        traces.Arrivals.read(tmp_path / "bad.json")
