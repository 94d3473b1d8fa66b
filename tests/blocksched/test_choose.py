"""The configuration choice, on recorded measurements (no GPU)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tally.blocksched.candidates import parse_config
from tally.blocksched.choose import KernelRecord, Measurement, Policy, choose, evaluate
from tally.errors import TallyError

GRID, BLOCK, SMS = (4096, 1, 1), (256, 1, 1), 132
T = 1_000_000.0  # the original kernel: 1 ms


def rec(*measurements, grid=GRID, has_ptx=True, refusals=None, original=T):
    ms = ([Measurement("original", original, 5)] if original else []) + [
        m if isinstance(m, Measurement) else Measurement(m[0], original / m[1], 5, *m[2:]) for m in measurements]
    return KernelRecord("_Z6kernelPf", grid, BLOCK, SMS, has_ptx, refusals or {}, tuple(ms))


# (record, policy, expected config, expected reason)
CASES = [
    pytest.param(rec(has_ptx=False), Policy(), "original", "original: no PTX", id="no-ptx"),
    pytest.param(rec(("preemptible:264", 0.9), refusals={m: "grid-wide sync or cooperative launch (reads %envreg1)"
                                                          for m in ("slice", "ptb", "preemptible")}),
                 Policy(), "original",
                 "original: kernel refused by tally.ptx: grid-wide sync or cooperative launch (reads %envreg1)",
                 id="refused-all"),
    pytest.param(rec(refusals={"slice": "a", "ptb": "b", "preemptible": "b"}), Policy(), "original",
                 "original: kernel refused by tally.ptx: slice: a; ptb: b; preemptible: b", id="refused-differently"),
    pytest.param(rec(grid=(132, 1, 1)), Policy(), "original",
                 "original: grid of 132 blocks fits on 132 SMs (no candidates)", id="one-wave"),
    pytest.param(rec(original=None), Policy(), "original", "original: not profiled yet", id="not-profiled"),
    # 1 ms / 0.92 over 16 waves of 264 workers, halved: 34 us
    pytest.param(rec(("preemptible:264", 0.92)), Policy(), "preemptible:264",
                 "preemptible w=264: 0.92x speed, est. preemption 34 us <= 100 us", id="paper-estimate"),
    pytest.param(rec(("preemptible:264", 0.92, None, 150_000.0)), Policy(), "original",
                 "original: no candidate within 100 us keeps >= 0.5x speed (shortest turnaround: "
                 "preemptible w=264: 0.92x speed, measured p99 preemption 150 us)", id="measured-p99-overrides"),
    pytest.param(rec(("slice:264", 0.95)), Policy(), "slice:264",
                 "slice n=16 (264 blocks each): 0.95x speed, slice time 66 us <= 100 us", id="slice-estimate"),
    pytest.param(rec(("slice:264", 0.95, 120_000.0)), Policy(), "original",
                 "original: no candidate within 100 us keeps >= 0.5x speed (shortest turnaround: "
                 "slice n=16 (264 blocks each): 0.95x speed, measured slice time 120 us)", id="measured-slice"),
    # faster but out of bound loses to slower in bound
    pytest.param(rec(("slice:1056", 0.99), ("preemptible:132", 0.8)), Policy(), "preemptible:132",
                 "preemptible w=132: 0.80x speed, est. preemption 20 us <= 100 us", id="bound-beats-speed"),
    # the fastest in bound wins
    pytest.param(rec(("preemptible:132", 0.7), ("preemptible:528", 0.9), ("slice:264", 0.85)), Policy(),
                 "preemptible:528", "preemptible w=528: 0.90x speed, est. preemption 69 us <= 100 us", id="fastest"),
    # the stepping thresholds stop at the floor
    pytest.param(rec(("preemptible:264", 0.45)), Policy(), "original",
                 "original: no candidate within 100 us keeps >= 0.5x speed (fastest within: "
                 "preemptible w=264: 0.45x speed, est. preemption 69 us)", id="below-floor"),
    pytest.param(rec(("preemptible:264", 0.45)), Policy(floor=0.1), "preemptible:264",
                 "preemptible w=264: 0.45x speed, est. preemption 69 us <= 100 us", id="paper-floor"),
    pytest.param(rec(("preemptible:264", 0.05)), Policy(floor=0.1), "original",
                 "original: no candidate within 100 us keeps >= 0.1x speed (fastest within: "
                 "preemptible w=264: 0.05x speed, est. preemption 625 us)".replace("fastest within", "shortest turnaround"),
                 id="below-paper-floor"),
    # the paper's benchmark bound (31.6 us) rules out what 100 us allows
    pytest.param(rec(("preemptible:264", 0.92), ("preemptible:132", 0.6)), Policy(bound_ns=31_600), "preemptible:132",
                 "preemptible w=132: 0.60x speed, est. preemption 26 us <= 32 us", id="tight-bound"),
    # a short original kernel stays as it is
    pytest.param(rec(("preemptible:264", 0.95), original=80_000.0), Policy(), "original",
                 "original: kernel time 80 us <= 100 us", id="short-original"),
    pytest.param(rec(("preemptible:264", 1.05), original=80_000.0), Policy(), "preemptible:264",
                 "preemptible w=264: 1.05x speed, est. preemption 2.4 us <= 100 us", id="faster-than-original"),
    # non-preemptible PTB: its whole time is its turnaround
    pytest.param(rec(("ptb:264", 1.1), ("preemptible:264", 0.7)), Policy(), "preemptible:264",
                 "preemptible w=264: 0.70x speed, est. preemption 45 us <= 100 us", id="ptb-not-preemptible"),
    # ties: equal speed -> smaller turnaround; equal both -> preemptible before slice
    pytest.param(rec(("slice:528", 0.9), ("slice:264", 0.9)), Policy(), "slice:264",
                 "slice n=16 (264 blocks each): 0.90x speed, slice time 69 us <= 100 us", id="tie-turnaround"),
    pytest.param(rec(Measurement("slice:512", T / 0.9, 5, 50_000.0), Measurement("preemptible:132", T / 0.9, 5, None, 50_000.0)),
                 Policy(), "preemptible:132",
                 "preemptible w=132: 0.90x speed, measured p99 preemption 50 us <= 100 us", id="tie-kind"),
    # a refused mode's measurements are not considered
    pytest.param(rec(("preemptible:264", 0.95), ("slice:264", 0.8), refusals={"ptb": "x", "preemptible": "x"}),
                 Policy(), "slice:264", "slice n=16 (264 blocks each): 0.80x speed, slice time 78 us <= 100 us",
                 id="partial-refusal"),
    # a measurement that does not fit the grid is ignored
    pytest.param(rec(("slice:4096", 1.0), ("preemptible:8192", 1.0)), Policy(), "original",
                 "original: not profiled yet".replace("not profiled yet", "no candidate within 100 us keeps >= 0.5x "
                 "speed (shortest turnaround: original: 1.00x speed, kernel time 1.00 ms)"), id="misfit"),
]


@pytest.mark.parametrize("record, policy, config, reason", CASES)
def test_choice(record, policy, config, reason):
    d = choose(record, policy)
    assert (d.config, d.reason) == (config, reason)
    assert d.bound_ns == policy.bound_ns and d.floor == policy.floor


def test_thresholds_step_down_to_the_floor():
    assert Policy(floor=0.1).thresholds() == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert Policy().thresholds() == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert Policy(floor=0.55).thresholds() == [1.0, 0.9, 0.8, 0.7, 0.6, 0.55]
    assert Policy(floor=1.0).thresholds() == [1.0]


@pytest.mark.parametrize("bound, floor", [(0, 0.5), (-1, 0.5), (float("nan"), 0.5), (100, 0), (100, 1.5)])
def test_bad_policy(bound, floor):
    with pytest.raises(TallyError):
        Policy(bound, floor)


def test_bad_measurements():
    for bad in (dict(config="slice:0", time_ns=1.0), dict(config="warp:3", time_ns=1.0),
                dict(config="original", time_ns=0.0), dict(config="original", time_ns=float("inf")),
                dict(config="original", time_ns=1.0, samples=0)):
        with pytest.raises((ValueError, TallyError)):
            Measurement(**bad)


CONFIGS = ["slice:132", "slice:264", "slice:1056", "ptb:132", "ptb:264", "preemptible:132", "preemptible:264",
           "preemptible:528", "preemptible:1056"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIGS), st.tuples(st.floats(0.02, 1.5), st.one_of(st.none(), st.floats(1e3, 3e5))),
                       max_size=len(CONFIGS)),
       st.floats(5e3, 5e6), st.floats(1e4, 5e5), st.floats(0.05, 1.0))
def test_choice_is_the_fastest_in_bound(measured, original_ns, bound, floor):
    ms = [Measurement("original", original_ns)]
    for config, (speed, p99) in measured.items():
        mode = parse_config(config).mode
        ms.append(Measurement(config, original_ns / speed, 1, p99 if mode == "slice" else None,
                              p99 if mode == "preemptible" else None))
    record = KernelRecord("k", GRID, BLOCK, SMS, measurements=tuple(ms))
    policy = Policy(bound, floor)
    d = choose(record, policy)
    rows = evaluate(record)
    ok = [r for r in rows if r.turnaround_ns <= bound * (1 + 1e-9) and r.speed >= floor - 1e-9]
    if not ok:
        assert d.config == "original" and "no candidate within" in d.reason
        return
    best = max(r.speed for r in ok)
    chosen = next(r for r in rows if r.candidate.key == d.config)
    assert chosen in ok and abs(chosen.speed - best) <= 1e-9
    assert d.reason.startswith(chosen.candidate.describe(GRID) + ":")
