"""Prometheus metrics read from the scoreboard (tally.daemon.metrics)."""
from __future__ import annotations

import os

import pytest

from tally import scoreboard as sb


def test_gpu_gate_state_per_best_effort_client(tally_daemon):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from tally.daemon.metrics import ScoreboardCollector

    daemon, board = tally_daemon
    gated = board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, comm="gated")
    board.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, comm="plain")
    board.gpu_gate_slots = 1 << gated
    board.slot_set(gated, "gpu_gate", sb.GPU_GATE_OPEN)
    registry = CollectorRegistry()
    registry.register(ScoreboardCollector(daemon))
    lines = [line for line in generate_latest(registry).decode().splitlines()
             if line.startswith("tally_client_gpu_gate{")]
    assert len(lines) == 1  # the client that does not use the gate has no series
    assert 'comm="gated"' in lines[0] and 'state="open"' in lines[0] and lines[0].endswith(" 1.0")
