"""Per-program kernel profiles in the agent (agent/profiles.c) through the doubles.

A best-effort client with TALLY_PROFILE_FILE seeds its duration estimates from
the file at join, so the budget is applied from a kernel's first launch, and
writes what it learned back at exit; a bad file is one warning and not trusted.
The file format is tally.profiles' (the reference implementation).
"""
from __future__ import annotations

import os
import time

import pytest

from tally import profiles as pf
from tally.errors import TallyError
from tally.scoreboard import PolicyParams

from test_sched import MS, WARNING, completed_ok, one_warning

# fake_app's timed cuLaunchKernel: kernel "mix_kernel_kernel", grid (1,2,1), block (32,1,1)
KERNEL = "mix_kernel_kernel"
GRID_THREADS = 64
US = 1000


def be_throttled(daemon, budget_ns: int) -> None:
    """HP present and recently active: BE is held to the turnaround budget."""
    sb = daemon.sb
    sb.set_params(PolicyParams(idle_window_ns=0, turnaround_budget_ns=budget_ns,
                               unthrottle_after_ns=1000 * 10**9, daemon_timeout_ns=60 * 10**9))
    sb.hp_active = 1
    sb.hp_last_launch_ns = time.monotonic_ns()


def run_be(daemon, run_app, profile_file, *steps, **extra):
    env = daemon.env("best-effort", TALLY_PROFILE_FILE=str(profile_file) if profile_file else None, **extra)
    r = run_app(*steps, env=env, timeout=60)
    completed_ok(r)
    return r


@pytest.mark.parametrize("seeded", [True, False])
def test_seeded_estimate_applies_from_the_first_launch(daemon, run_app, tmp_path, seeded):
    # Budget 100 us; the kernel is seeded at 30 us: three fit at once. The kernels
    # really last 20 ms, so the first completion (and what is learned from it)
    # comes long after the first three launches were admitted.
    be_throttled(daemon, 100 * US)
    path = tmp_path / "profiles" / "prog.txt"
    if seeded:
        pf.write(path, [pf.Profile(KERNEL, GRID_THREADS, 30 * US, 5)])
    r = run_be(daemon, run_app, path, "launch:kernel:4:20000:s0", "sync")
    assert r.stderr == ""
    assert r.gpu("gpu_kernels") == 4
    # Unseeded, an unknown kernel is estimated at the whole budget and runs alone. Seeded, three
    # go at once; a fourth may join in the moment before the first has run its whole (wrong)
    # estimate, since the budget counts only the work still to run.
    assert r.gpu("gpu_max_inflight") in ((3, 4) if seeded else (1,))
    # What was learned is written back at exit (test_learned_table_... checks that
    # in detail; learning needs timings the gate trusts, so it is not asserted here).
    learned = pf.read(path)
    if learned:
        (p,) = learned.values()
        assert (p.name, p.grid_threads) == (KERNEL, GRID_THREADS)
        if p.samples > (5 if seeded else 0):
            assert p.est_ns > 1 * MS  # moved up from the seed towards 20 ms


def test_learned_table_is_written_at_exit_and_reloaded(daemon, run_app, tmp_path):
    be_throttled(daemon, 10 * MS)
    path = tmp_path / "prog.txt"
    # Run 1: no file yet. 4 ms kernels, timed while the next launch waits.
    run_be(daemon, run_app, path, "launch:kernel:10:4000:s0", "sync")
    first = pf.read(path, missing_ok=False)
    (p1,) = first.values()
    assert (p1.name, p1.grid_threads) == (KERNEL, GRID_THREADS)
    assert 1 <= p1.samples <= 10
    assert p1.est_ns >= 2 * MS, p1  # about 4 ms (more on a loaded machine: the fake GPU runs late)
    assert path.read_bytes().startswith(b"tally-profiles 1 1\n")
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith("prog.txt")] == ["prog.txt"]
    # Run 2 reloads it, with a budget that fits three of the estimate: three
    # kernels are admitted together from the first launch. (They really last 50
    # ms now: unseeded, each would run alone, the first at the budget's estimate
    # and the next at what it learned.)
    be_throttled(daemon, 3 * p1.est_ns + p1.est_ns // 2)
    r = run_be(daemon, run_app, path, "launch:kernel:5:50000:s0", "sync")
    # (a fourth joins once the first has run half its estimate: the budget counts only the work
    # still to run, and these kernels overrun their estimate tenfold)
    assert r.gpu("gpu_max_inflight") >= 3
    (p2,) = pf.read(path).values()
    assert p2.est_ns > p1.est_ns  # moved towards 50 ms
    assert p2.samples > p1.samples  # counts add up across runs (learning needs the gate polling)


@pytest.mark.parametrize("kernel_times", ["on", "off"])
def test_estimates_learn_from_gpu_kernel_times(daemon, run_app, tmp_path, kernel_times):
    # The fake GPU runs each kernel 2 ms, and its CUPTI activity records say 300 us: which
    # one the estimate ends at tells where it was learned. With kernel times (the default
    # once an HP client is present) the records' GPU time replaces what the polls saw; with
    # TALLY_KERNEL_TIMES=0 the polls' timing, 2 ms or more, is all there is.
    be_throttled(daemon, 10 * MS)
    path = tmp_path / "timed.txt"
    extra = {"FAKE_CUPTI_KERNEL_NS": str(300 * US)}
    if kernel_times == "on":
        extra["TALLY_KERNEL_TIMES"] = "1"
    r = run_be(daemon, run_app, path, "launch:kernel:12:2000:s0", "sync", **extra)
    (p,) = pf.read(path, missing_ok=False).values()
    stats = r.stats()
    if kernel_times == "on":
        assert stats["kernel_times"] == "on"
        # the first launch starts the Activity API; every later one is timed by the GPU
        assert 1 <= stats["gpu_timed_samples"] <= 12
        assert p.est_ns == 300 * US, p
    else:
        assert (stats["kernel_times"], stats["gpu_timed_samples"]) == ("disabled", 0)
        assert p.est_ns >= 1 * MS, p


def test_no_kernel_times_next_to_a_chained_profiler(daemon, run_app, doubles, tmp_path):
    # A profiler injected before tally owns the Activity API's buffer callbacks: left alone.
    be_throttled(daemon, 10 * MS)
    r = run_be(daemon, run_app, tmp_path / "p.txt", "launch:kernel:6:500:s0", "sync",
               TALLY_CHAINED_INJECTION=str(doubles.profiler), FAKE_PROFILER_SUBSCRIBE="0",
               TALLY_KERNEL_TIMES="1")
    assert "fake_profiler: initialized calls=1" in r.stdout
    assert (r.stats()["kernel_times"], r.stats()["gpu_timed_samples"]) == ("unavailable", 0)


def test_no_kernel_times_without_an_hp_client(daemon, run_app, tmp_path):
    # Nobody to protect: BE launches take the gate's fast path and CUPTI activity never starts.
    sb = daemon.sb
    sb.hp_active = 0
    r = run_be(daemon, run_app, tmp_path / "alone.txt", "launch:kernel:4:200:s0", "sync",
               TALLY_KERNEL_TIMES="1")
    assert (r.stats()["kernel_times"], r.stats()["gpu_timed_samples"]) == ("off", 0)


def test_no_file_is_written_without_a_profile_file_or_for_high_priority(daemon, run_app, tmp_path):
    be_throttled(daemon, 10 * MS)
    run_be(daemon, run_app, None, "launch:kernel:3:2000:s0", "sync")
    path = tmp_path / "hp.txt"
    r = run_app("launch:kernel:3:2000:s0", "sync", env=daemon.env("high", TALLY_PROFILE_FILE=str(path)))
    completed_ok(r)
    assert not path.exists()
    assert sorted(q.name for q in tmp_path.iterdir() if q.suffix == ".txt") == []


def _corrupt(case: str) -> bytes:
    good = pf.dumps([pf.Profile(KERNEL, GRID_THREADS, 30 * US, 5), pf.Profile("_Z5otherv", 32, 7 * US, 2)])
    if case == "foreign":
        return os.urandom(512)
    if case == "wrong_version":
        return good.replace(b"tally-profiles 1 ", b"tally-profiles 2 ", 1)
    if case == "truncated":
        return good[:-9]
    if case == "missing_line":
        return good[: good.rindex(b"\n", 0, -1) + 1]
    if case == "bad_hash":
        return good.replace(KERNEL.encode(), b"mix_kernel_kernal", 1)  # the name changed, its hash did not
    if case == "trailing":
        return good + b"extra"
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragment", [
    ("foreign", "is not a tally profile file"),
    ("wrong_version", "another format version"),
    ("truncated", "truncated or corrupt"),
    ("missing_line", "truncated or corrupt"),
    ("bad_hash", "truncated or corrupt"),
    ("trailing", "bytes after its last kernel"),
])
def test_bad_profile_file_is_one_warning_and_not_trusted(daemon, run_app, tmp_path, case, fragment):
    be_throttled(daemon, 100 * US)
    path = tmp_path / "prog.txt"
    data = _corrupt(case)
    path.write_bytes(data)
    with pytest.raises(TallyError):
        pf.parse(data)  # the reference reader rejects it too
    r = run_be(daemon, run_app, path, "launch:kernel:4:20000:s0", "sync")
    line = one_warning(r, fragment, str(path), "ignored")
    assert WARNING.match(line)
    assert r.gpu("gpu_max_inflight") == 1  # the 30 us in the file was not believed
    # At exit the bad file is replaced by what this run learned (if it learned anything).
    if path.read_bytes() != data:
        (p,) = pf.read(path).values()
        assert (p.name, p.grid_threads) == (KERNEL, GRID_THREADS) and p.est_ns > 10 * MS


def test_unwritable_profile_file_is_one_warning(daemon, run_app, tmp_path):
    be_throttled(daemon, 10 * MS)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "prog.txt"  # its directory cannot be created
    r = run_be(daemon, run_app, path, "launch:kernel:4:30000:s0", "sync")
    one_warning(r, "cannot be written")
