"""tally.slo (the per-request latency API) writing into a real scoreboard, the
histogram it fills, and `tally run --slo-p99-ms` argument errors."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tally import scoreboard as sb
from tally import slo

MS = 1_000_000


@pytest.fixture
def board(tmp_path):
    b = sb.Scoreboard.create(tmp_path / "tally-0-GPU-x", "GPU-x")
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _fresh_reporter():
    slo.use(None)
    yield
    slo.use(None)


def test_buckets_are_log_spaced_and_cover_the_range():
    assert sb.slo_bucket(0) == 0 and sb.slo_bucket(8191) == 0 and sb.slo_bucket(8192) == 1
    assert sb.slo_bucket(2 * 8192) == 1 + sb.SLO_HIST_PER_OCTAVE
    assert sb.slo_bucket(10**15) == sb.SLO_HIST_BUCKETS - 1
    for ns in (10_000, 123_456, 5 * MS, 20 * MS, 3_000 * MS):
        low, high = sb.slo_bucket_bounds(sb.slo_bucket(ns))
        assert low <= ns < high


def test_quantile_of_a_histogram():
    counts = [0] * sb.SLO_HIST_BUCKETS
    for ns in [1 * MS] * 990 + [50 * MS] * 10:
        counts[sb.slo_bucket(ns)] += 1
    assert sb.hist_quantile(counts, 0.99) < 1.2 * MS
    counts[sb.slo_bucket(50 * MS)] += 1
    low, high = sb.slo_bucket_bounds(sb.slo_bucket(50 * MS))
    assert low <= sb.hist_quantile(counts, 0.99) < high
    assert sb.hist_quantile([0] * sb.SLO_HIST_BUCKETS, 0.99) == 0.0


def test_report_and_request_write_the_slot_record(board):
    slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, slo_p99_ns=20 * MS)
    slo.use(slo.Reporter.for_scoreboard(board, slot))
    slo.report(0.005)
    slo.report(0.030)
    with slo.request():
        pass
    with pytest.raises(ValueError):
        with slo.request():
            raise ValueError("a failed request is still a request")
    count, total = board.slo_requests(slot)
    hist = board.slo_hist(slot)
    assert count == 4 and sum(hist) == 4
    assert hist[sb.slo_bucket(5 * MS)] == 1 and hist[sb.slo_bucket(30 * MS)] == 1
    assert 35 * MS <= total < 36 * MS
    assert board.client(slot)["requests"] == 4
    # other slots untouched; a reused slot starts empty
    other = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
    assert board.slo_requests(other) == (0, 0)
    board.release_slot(slot)
    assert board.slo_requests(slot) == (0, 0) and sum(board.slo_hist(slot)) == 0


def test_threads_reporting_lose_nothing(board):
    slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH)
    r = slo.Reporter.for_scoreboard(board, slot)
    threads = [threading.Thread(target=lambda: [r.report_ns(MS) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert board.slo_requests(slot)[0] == 8000 and sum(board.slo_hist(slot)) == 8000


def test_without_an_agent_the_api_is_a_no_op(monkeypatch):
    monkeypatch.delenv("CUDA_INJECTION64_PATH", raising=False)
    assert slo.reporter() is None
    slo.report(0.01)
    with slo.request():
        pass


def test_the_agent_reports_no_slot_before_it_joined(monkeypatch):
    """The exported tally_agent_slot of the real agent, loaded outside CUDA: not joined, -1."""
    import importlib.resources

    agent = importlib.resources.files("tally") / "libtally_agent.so"
    if not agent.is_file():
        pytest.skip("no built agent")
    code = ("import ctypes, os; from tally import slo; "
            "lib = ctypes.CDLL(os.environ['CUDA_INJECTION64_PATH']); "
            "p = ctypes.c_void_p(); print(lib.tally_agent_slot(ctypes.byref(p)), slo.reporter())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CUDA_INJECTION64_PATH": str(agent)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["-1", "None"]


def _tally(*args):
    return subprocess.run([sys.executable, "-m", "tally", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, fragment", [
    (("--slo-p99-ms", "20"), "--slo-p99-ms needs --priority high"),
    (("--priority", "best-effort", "--slo-p99-ms", "20"), "--slo-p99-ms needs --priority high"),
    (("--priority", "high", "--slo-p99-ms", "0"), "positive number of milliseconds"),
    (("--priority", "high", "--slo-p99-ms", "-5"), "positive number of milliseconds"),
])
def test_run_slo_errors_are_one_line(args, fragment):
    r = _tally("run", *args, "--", "true")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tally: error: ") and fragment in lines[0], r.stderr


def test_run_slo_needs_a_number():
    r = _tally("run", "--priority", "high", "--slo-p99-ms", "fast", "--", "true")
    assert r.returncode != 0 and "fast" in r.stderr and "Traceback" not in r.stderr
