"""The worker's garbage-collector handling: heap frozen after warm-up, pauses recorded."""
from __future__ import annotations

import gc

import pytest

from tally.bench import worker


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_settle_heap_freezes_survivors(unfrozen, monkeypatch):
    monkeypatch.delenv(worker.GC_FREEZE_ENV, raising=False)
    keep = [[i] for i in range(1000)]
    assert worker.settle_heap() is True
    assert gc.get_freeze_count() >= len(keep)


def test_settle_heap_can_be_turned_off(unfrozen, monkeypatch):
    monkeypatch.setenv(worker.GC_FREEZE_ENV, "0")
    gc.unfreeze()
    assert worker.settle_heap() is False
    assert gc.get_freeze_count() == 0


def test_gc_pauses_counts_collections_inside_the_window_only():
    gc.collect()
    with worker.GcPauses() as pauses:
        gc.collect(0)
        gc.collect(2)
    gc.collect()  # outside: not counted
    data = pauses.to_json()
    assert data["collections_by_generation"][0] >= 1 and data["collections_by_generation"][2] >= 1
    assert 0 < data["pause_max_s"] <= data["pause_total_s"]
    assert pauses._callback not in gc.callbacks


def test_gc_pauses_are_stored_into_the_result_even_when_the_window_is_cut_short():
    result: dict = {}
    with pytest.raises(KeyboardInterrupt):
        with worker.GcPauses(into=result):
            gc.collect(0)
            raise KeyboardInterrupt
    assert result["gc"]["collections_by_generation"][0] >= 1
