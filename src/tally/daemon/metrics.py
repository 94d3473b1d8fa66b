"""Prometheus metrics, read from the scoreboards at scrape time (the agents
keep the counters; nothing is copied on the daemon's tick)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tally import scoreboard as sbmod

if TYPE_CHECKING:
    from tally.daemon.daemon import Daemon

GPU_LABELS = ["gpu"]
CLIENT_LABELS = ["gpu", "slot", "pid", "priority", "comm"]

# per-client metric: (family type, name, help, scoreboard field, scale)
CLIENT_METRICS = [
    (CounterMetricFamily, "tally_client_launches", "Kernel launches", "launches", 1),
    (CounterMetricFamily, "tally_client_graph_launches", "CUDA graph launches", "graph_launches", 1),
    (CounterMetricFamily, "tally_client_held_seconds", "Time BE launches were held at the gate", "held_ns", 1e-9),
    (CounterMetricFamily, "tally_client_held_launches", "BE launches that were held", "held_launches", 1),
    (CounterMetricFamily, "tally_client_long_kernels", "BE kernels admitted alone (estimate over the budget)",
     "long_kernels", 1),
    (CounterMetricFamily, "tally_client_sliced_launches", "BE launches run as slices (block-level scheduling)",
     "sliced_launches", 1),
    (GaugeMetricFamily, "tally_client_in_flight", "Launches not yet completed", "in_flight", 1),
    (GaugeMetricFamily, "tally_client_failopen", "Nonzero if the agent failed open", "failopen", 1),
    (GaugeMetricFamily, "tally_client_slo_p99_target_seconds", "HP p99 latency target (0 = none)", "slo_p99_ns",
     1e-9),
    (CounterMetricFamily, "tally_client_requests", "Requests the HP program reported (tally.slo)", "requests", 1),
    (CounterMetricFamily, "tally_client_request_seconds", "Sum of the reported request latencies",
     "request_sum_ns", 1e-9),
    (CounterMetricFamily, "tally_client_busy_periods", "HP busy periods started (the SLO proxy)", "busy_periods", 1),
]


class ScoreboardCollector(Collector):
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon

    def collect(self) -> Iterator:
        d = self.daemon
        start = GaugeMetricFamily("tally_daemon_start_time_seconds", "Unix time the tally daemon started")
        start.add_metric([], d.started_wall)
        clients = GaugeMetricFamily("tally_clients", "Active client processes", labels=["gpu", "priority"])
        hp_active = GaugeMetricFamily("tally_hp_active", "Active high-priority clients, as the agents see it",
                                      labels=GPU_LABELS)
        heartbeat_age = GaugeMetricFamily("tally_heartbeat_age_seconds", "Age of the daemon heartbeat",
                                          labels=GPU_LABELS)
        repairs = CounterMetricFamily("tally_slot_repairs", "Slots repaired after their client died",
                                      labels=GPU_LABELS)
        budget = GaugeMetricFamily("tally_turnaround_budget_seconds",
                                   "BE turnaround budget in effect (SLO mode adapts it)", labels=GPU_LABELS)
        slo_target = GaugeMetricFamily("tally_slo_target_seconds",
                                       "p99 target the SLO controller holds to (0 = SLO mode off)", labels=GPU_LABELS)
        slo_p99 = GaugeMetricFamily("tally_slo_p99_seconds", "Observed HP p99 latency of that client over the "
                                    "controller's window (0 = not measured)", labels=GPU_LABELS)
        slo_state = GaugeMetricFamily("tally_slo_state", "1 for the SLO controller's state at its last step",
                                      labels=["gpu", "state"])
        per_client = [(kind(name, doc, labels=CLIENT_LABELS), field, scale)
                      for kind, name, doc, field, scale in CLIENT_METRICS]
        gpu_gate = GaugeMetricFamily("tally_client_gpu_gate", "1 for the state of a BE client's GPU-side gate "
                                     "(TALLY_GPU_GATE): open, closed or disabled", labels=[*CLIENT_LABELS, "state"])

        now = time.monotonic_ns()
        with d.boards_lock:
            for board in d.boards:
                uuid = board.gpu_uuid
                counts = dict.fromkeys(sbmod.PRIORITY_NAMES.values(), 0)
                for c in board.clients():
                    if c["state"] != sbmod.SLOT_ACTIVE or not c["pid"]:
                        continue
                    counts[c["priority_name"]] = counts.get(c["priority_name"], 0) + 1
                    labels = [uuid, str(c["slot"]), str(c["pid"]), c["priority_name"], c["comm"]]
                    for family, field, scale in per_client:
                        family.add_metric(labels, c[field] * scale)
                    if c["gpu_gate_state"]:
                        gpu_gate.add_metric([*labels, c["gpu_gate_state"]], 1)
                for priority, n in counts.items():
                    clients.add_metric([uuid, priority], n)
                hp_active.add_metric([uuid], board.hp_active)
                beat = board.daemon_heartbeat_ns
                heartbeat_age.add_metric([uuid], (now - beat) / 1e9 if beat else float("inf"))
                repairs.add_metric([uuid], d.repairs.get(uuid, 0))
                budget.add_metric([uuid], board.turnaround_budget_ns / 1e9)
                slo_target.add_metric([uuid], board.slo_target_ns / 1e9)
                slo_p99.add_metric([uuid], board.slo_p99_ns / 1e9)
                slo_state.add_metric([uuid, sbmod.SLO_STATE_NAMES.get(board.slo_state, str(board.slo_state))], 1)
        yield from (start, clients, hp_active, heartbeat_age, repairs, budget, slo_target, slo_p99, slo_state,
                    gpu_gate)
        yield from (family for family, _, _ in per_client)
