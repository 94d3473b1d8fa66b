"""The agent's part of SLO mode, against the fake GPU: TALLY_SLO_P99_MS lands
in the HP slot, and HP launches after an idle gap start busy periods."""
from __future__ import annotations

from tally import scoreboard as sbmod

from test_sched import completed_ok, inspect_while_alive

MS = 1_000_000


def test_hp_slot_carries_the_slo_and_counts_busy_periods(daemon, spawn_app, tmp_path):
    # two bursts separated by a sync and a 30 ms pause (> the 100 us idle window): two busy periods;
    # launches within a burst (nothing idle between them) do not start new ones
    (c, _), r = inspect_while_alive(
        daemon, spawn_app, tmp_path,
        ["launch:kernel:3:1000:s0", "sync", "sleep:30000", "launch:kernel:3:1000:s0", "sync"], "high",
        env={"TALLY_SLO_P99_MS": "12.5"})
    completed_ok(r)
    assert c["slo_p99_ns"] == 12_500_000
    assert c["busy_periods"] == 2 and c["busy_start_ns"] >= c["claim_ns"]
    assert c["busy_start_ns"] <= c["last_launch_ns"]


def test_hp_without_slo_has_none(daemon, spawn_app, tmp_path):
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:2:1000:s0", "sync"], "high")
    completed_ok(r)
    assert c["slo_p99_ns"] == 0 and c["busy_periods"] == 1


def test_slo_on_best_effort_or_bad_values_warns_and_is_ignored(daemon, spawn_app, tmp_path):
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:1:0:s0", "sync"], "best-effort",
                                    env={"TALLY_SLO_P99_MS": "10"})
    assert c["slo_p99_ns"] == 0 and "not high priority" in r.stderr
    (c, _), r = inspect_while_alive(daemon, spawn_app, tmp_path, ["launch:kernel:1:0:s0", "sync"], "high",
                                    env={"TALLY_SLO_P99_MS": "soon"})
    assert c["slo_p99_ns"] == 0 and "TALLY_SLO_P99_MS=soon" in r.stderr
    assert c["priority"] == sbmod.PRIORITY_HIGH
