"""Block-level scheduling in the agent (agent/blocksched.c, be_launch_sliced in sched.c).

With TALLY_BLOCKSCHED_PLAN naming a plan, a best-effort launch of a planned
kernel (matched by the image its module was loaded from and its entry name)
runs as slices of `<entry>__tally_slice`, each admitted by the gate. The fake
driver reads a launch's arguments from the parameter block after API enter,
as the real one does, and records every kernel it runs; a kernel lasts a
fixed time per wave of SMs x occupancy blocks (4 x 2 here).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tally.blocksched import live
from tally.scoreboard import PolicyParams
from test_modules import PTX, fnv1a64
from test_sched import GATE_OPEN, MS, completed_ok, throttle_be

ENTRY = "k"  # the .entry of test_modules.PTX
WAVE = 8     # FAKE_CUDA_SM_COUNT (4) x FAKE_CUDA_OCCUPANCY (2)
RECORD = re.compile(r"^fake_app: record (\d+) (\S+) grid=(\d+),(\d+),(\d+) first=(\S+) appended=(\d+),(\d+),(\d+),(\d+)$",
                    re.M)


def write_plan(tmp_path: Path, image: bytes = PTX, entry: str = ENTRY, nparams: int = 2,
               cubin: bytes = b"\x7fELF a transformed module", cubin_hash: int | None = None) -> Path:
    cubin_path = tmp_path / "cubins" / f"{fnv1a64(cubin):016x}.cubin"
    cubin_path.parent.mkdir(exist_ok=True)
    cubin_path.write_bytes(cubin)
    plan = tmp_path / "plan"
    plan.write_text("tally-blocksched-plan 1\n# test\n"
                    f"slice {fnv1a64(image):016x} {entry} {nparams} {cubin_hash or fnv1a64(cubin):016x} {cubin_path}\n")
    return plan


def records(r) -> list[dict]:
    out = []
    for m in RECORD.finditer(r.stdout):
        out.append({"name": m.group(2), "grid": tuple(int(m.group(i)) for i in (3, 4, 5)), "first": m.group(6),
                    "appended": tuple(int(m.group(i)) for i in (7, 8, 9, 10))})
    return out


def run_be(daemon, run_app, tmp_path, steps, plan: Path | None, budget_ns=1_200_000, env=None, api="data"):
    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    throttle_be(daemon.sb, budget_ns)
    e = {"TALLY_BLOCKSCHED_PLAN": str(plan) if plan else None, **(env or {})}
    return run_app(f"load:{api}:{image}", f"pkfunc:{ENTRY}", *steps, "sync", "records",
                   env=daemon.env("best-effort", **e))


def slices_of(recs: list[dict], grid: tuple[int, int, int]) -> list[list[dict]]:
    """The sliced launches: runs of consecutive slice records covering one grid."""
    total = grid[0] * grid[1] * grid[2]
    launches, current = [], []
    for rec in recs:
        if not rec["name"].endswith("__tally_slice"):
            assert not current, "an original launch ran in the middle of a sliced one"
            continue
        current.append(rec)
        if rec["appended"][3] + rec["grid"][0] == total:
            launches.append(current)
            current = []
    assert not current, "a sliced launch did not cover its grid"
    return launches


def assert_exact_cover(launch: list[dict], grid: tuple[int, int, int], first: str) -> None:
    total = grid[0] * grid[1] * grid[2]
    offset = 0
    for rec in launch:
        assert rec["appended"][:3] == grid  # the original grid, for %nctaid and %ctaid
        assert rec["appended"][3] == offset  # in order, no gap, no overlap
        assert rec["grid"][1:] == (1, 1)
        assert rec["first"] == first  # the program's own arguments, passed through
        offset += rec["grid"][0]
    assert offset == total


def test_planned_kernel_runs_as_gated_slices_covering_its_grid(daemon, run_app, tmp_path):
    # 64 blocks = 8 waves of 0.15 ms: 1.2 ms whole; budget 0.44 ms. The first launch runs as
    # one-wave slices, which time a wave; later slices are as many waves as that estimate
    # fits in the budget. (How exactly the estimate settles depends on this machine's timing;
    # test_a_known_kernel_time_sizes_the_slices_from_the_first_launch checks the arithmetic.)
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:6:32:2:128:150:kernel"], write_plan(tmp_path),
               budget_ns=440_000)
    completed_ok(r)
    recs = records(r)
    launches = slices_of(recs, (32, 2, 1))
    whole = [rec for rec in recs if rec["name"] == ENTRY]
    assert len(launches) + len(whole) == 6 and len(launches) >= 1
    assert all(rec["grid"] == (32, 2, 1) for rec in whole)
    for launch in launches:
        assert_exact_cover(launch, (32, 2, 1), r.values["pk_first_param"])
        assert all(rec["grid"][0] % WAVE == 0 for rec in launch)  # whole waves
    assert recs[0]["name"] == ENTRY + "__tally_slice"
    assert [rec["grid"][0] for rec in launches[0]] == [WAVE] * 8
    sizes = [rec["grid"][0] for launch in launches for rec in launch]
    # Each slice is admitted by the gate on its own (a completion write per launch).
    assert r.gpu("gpu_writes_issued") == len(sizes) + len(whole)
    stats = r.stats()["blocksched"]
    assert stats["plan_kernels"] == 1
    assert stats["sliced_launches"] == len(launches) and stats["slices"] == len(sizes)
    assert stats["unsliced_launches"] == len(whole) and stats["sliced_est_ns"] > 0
    (kernel,) = stats["kernels"]
    assert kernel["entry"] == ENTRY and kernel["usable"] and kernel["sliced_launches"] == len(launches)
    assert kernel["whole_launches"] == len(whole)
    # the last sliced launch's configuration, as `tally blocksched show` reports it
    assert kernel["wave_blocks"] == WAVE and kernel["budget_ns"] == 440_000
    assert kernel["waves_per_slice"] * WAVE == launches[-1][0]["grid"][0]
    (shown,) = live.parse(json.dumps(r.stats()).encode(), "stats")  # what `tally blocksched show` reads
    assert shown.sliced_launches == len(launches) and shown.describe().startswith("sliced ")


def test_a_known_kernel_time_sizes_the_slices_from_the_first_launch(daemon, run_app, tmp_path):
    """The whole kernel's estimate (here seeded from the program's profile file, as `tally
    profiles seed` or an earlier run leaves it) gives the wave time at once."""
    profile = tmp_path / "profile"
    name = ENTRY.encode()
    # 64 blocks of 128 threads: 2.4 ms whole, 8 waves of 0.3 ms; budget 1 ms: 3 waves a slice
    profile.write_text(f"tally-profiles 1 1\n{fnv1a64(name):016x} {64 * 128} 2400000 5 {ENTRY}\n")
    # (floor 0: slices timed slow on a busy machine must not make it run whole here)
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:3:64:1:128:300:kernel"], write_plan(tmp_path), budget_ns=MS,
               env={"TALLY_PROFILE_FILE": str(profile), "TALLY_BLOCKSCHED_FLOOR": "0"})
    completed_ok(r)
    launches = slices_of(records(r), (64, 1, 1))
    assert len(launches) == 3
    assert [rec["grid"][0] for rec in launches[0]] == [24, 24, 16]
    # later launches go by the slices' own timing (which errs long): fewer waves, never more
    assert all(rec["grid"][0] in (8, 16, 24) for launch in launches[1:] for rec in launch[:-1])
    (kernel,) = r.stats()["blocksched"]["kernels"]
    assert kernel["waves_per_slice"] * WAVE == launches[-1][0]["grid"][0] and kernel["budget_ns"] == MS
    assert kernel["wave_ns"] > 0 and kernel["waves_per_slice"] == max(1, MS // kernel["wave_ns"])


def test_a_saved_wave_time_sizes_the_first_launchs_slices(daemon, run_app, tmp_path):
    """A wave's time is kept in the profile file under the slice kernel's name (as an earlier
    run saves it): the first launch is already sliced by it, not into one-wave slices."""
    profile = tmp_path / "profile"
    # a wave of 64 blocks' kernel is 8 blocks of 128 threads: 0.3 ms; budget 1 ms: 3 waves a slice
    profile.write_text(f"tally-profiles 1 1\n{fnv1a64((ENTRY + '__tally_slice').encode()):016x} {WAVE * 128} "
                       f"300000 5 {ENTRY}__tally_slice\n")
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:1:64:1:128:300:kernel"], write_plan(tmp_path), budget_ns=MS,
               env={"TALLY_PROFILE_FILE": str(profile), "TALLY_BLOCKSCHED_FLOOR": "0"})
    completed_ok(r)
    (launch,) = slices_of(records(r), (64, 1, 1))
    assert [rec["grid"][0] for rec in launch] == [24, 24, 16]


def test_a_run_saves_its_wave_time_for_the_next(daemon, run_app, tmp_path):
    profile = tmp_path / "profile"
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:8:64:1:128:150:kernel"], write_plan(tmp_path), budget_ns=MS,
               env={"TALLY_PROFILE_FILE": str(profile), "TALLY_BLOCKSCHED_FLOOR": "0"})
    completed_ok(r)
    assert [rec["grid"][0] for rec in slices_of(records(r), (64, 1, 1))[0]] == [WAVE] * 8  # nothing known yet
    if not profile.exists():
        # samples are learned only when timed precisely enough, which a loaded machine can prevent
        pytest.skip("no duration sample was precise enough to learn on this machine now")
    lines = profile.read_text().splitlines()[1:]
    assert any(line.split()[1] == str(WAVE * 128) and line.endswith(f" {ENTRY}__tally_slice") for line in lines)


def saved_wave(tmp_path: Path, samples: int) -> Path:
    """A profile file with a wave of the 64-block kernel timed at 0.3 ms over `samples` slices."""
    profile = tmp_path / "profile"
    profile.write_text(f"tally-profiles 1 1\n{fnv1a64((ENTRY + '__tally_slice').encode()):016x} {WAVE * 128} "
                       f"300000 {samples} {ENTRY}__tally_slice\n")
    return profile


def test_with_the_gpu_side_gate_slices_wait_on_the_gpu_once_a_wave_is_timed(daemon, run_app, tmp_path):
    """tally run --block-level --gpu-gate: with a wave's time learned from enough timed slices, every
    slice is preceded by a wait on the gate word instead of being admitted (and tracked) at launch;
    they still cover the grid exactly, in order, sized by the budget."""
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:2:64:1:128:300:kernel"], write_plan(tmp_path), budget_ns=MS,
               env={"TALLY_PROFILE_FILE": str(saved_wave(tmp_path, 5)), "TALLY_BLOCKSCHED_FLOOR": "0",
                    "TALLY_GPU_GATE": "1"})
    completed_ok(r)
    launches = slices_of(records(r), (64, 1, 1))
    assert [[rec["grid"][0] for rec in launch] for launch in launches] == [[24, 24, 16]] * 2
    for launch in launches:
        assert_exact_cover(launch, (64, 1, 1), r.values["pk_first_param"])
    assert r.gpu("gpu_waits_issued") == r.gpu("gpu_waits_done") == 6  # one per slice
    assert r.gpu("gpu_writes_issued") == 0  # none admitted at launch, none tracked
    st = r.stats()["blocksched"]
    assert st["sliced_launches"] == 2 and st["slices"] == st["gpu_gated_slices"] == 6
    # in the sliced share like slices admitted at launch: HP present, not idle past unthrottle
    assert st["sliced_est_ns"] == 2 * (3 + 3 + 2) * 300_000


def test_with_the_gpu_side_gate_untimed_slices_are_admitted_at_launch(daemon, run_app, tmp_path):
    """Too few timed slices (3 of 4): the slices are admitted and timed at launch as before, so the
    wave's time keeps being learned; no slice waits on the GPU."""
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:1:64:1:128:300:kernel"], write_plan(tmp_path), budget_ns=MS,
               env={"TALLY_PROFILE_FILE": str(saved_wave(tmp_path, 3)), "TALLY_BLOCKSCHED_FLOOR": "0",
                    "TALLY_GPU_GATE": "1"})
    completed_ok(r)
    (launch,) = slices_of(records(r), (64, 1, 1))
    assert [rec["grid"][0] for rec in launch] == [24, 24, 16]
    assert r.gpu("gpu_waits_issued") == 0 and r.gpu("gpu_writes_issued") == 3
    assert r.stats()["blocksched"]["gpu_gated_slices"] == 0


def test_gpu_gated_slices_are_held_on_the_gpu_while_hp_is_busy(daemon, spawn_app, tmp_path):
    """HP busy: the sliced launch returns at once (the thread is not held), and its slices run only
    after HP's work completed."""
    from test_sched import hp_client_in_flight

    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    throttle_be(daemon.sb, MS)
    hp = hp_client_in_flight(daemon.sb)
    go = tmp_path / "go"
    app = spawn_app(f"load:data:{image}", f"pkfunc:{ENTRY}", "pklaunch:1:64:1:128:300:kernel", f"wait_file:{go}",
                    "sync", "launch:kernel:1:0:s1", "records",
                    env=daemon.env("best-effort", TALLY_BLOCKSCHED_PLAN=str(write_plan(tmp_path)),
                                   TALLY_PROFILE_FILE=str(saved_wave(tmp_path, 5)), TALLY_BLOCKSCHED_FLOOR="0",
                                   TALLY_GPU_GATE="1"))
    app.wait_for("waiting")  # the sliced launch returned although HP is busy
    go.touch()
    time.sleep(0.1)  # the sync waits: a slice that passed its wait would need the word open
    slot = next(i for i in daemon.slots_of(app.pid))
    assert not daemon.sb.slot_get(slot, "gpu_gate") & GATE_OPEN, "the agent opened its gate while HP was busy"
    released = time.monotonic_ns()
    daemon.sb.set_lane_completed(hp, 3, 7)
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    (launch,) = slices_of(records(r), (64, 1, 1))
    # the plain kernel after it is not in the plan: under block-level scheduling, whole kernels
    # take the launch-level gate (and are tracked), so only the slices waited on the GPU
    assert len(launch) == 3 and r.gpu("gpu_waits_done") == 3 and r.gpu("gpu_writes_issued") == 1
    assert r.launches[0][0] > released  # the sync before this launch returned only once HP had completed
    # held at the gate: the program's one launch (not its three slices), for the 0.1 s HP stayed busy
    assert daemon.sb.slot_get(slot, "held_launches") == 1
    assert daemon.sb.slot_get(slot, "held_ns") >= 100 * MS


def test_run_ahead_and_slices_wait_out_a_saturated_hp_client(daemon, spawn_app, tmp_path):
    """Run-ahead queues two launches while HP is busy; a planned launch after them waits until they
    are released, however long HP stays busy while its work keeps completing (three times the max
    hold here): nobody fails open, and the slices run after the queued launches."""
    from test_sched import hp_client_in_flight, keep_hp_busy_completing

    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    throttle_be(daemon.sb, MS)
    hp = hp_client_in_flight(daemon.sb)
    app = spawn_app(f"load:data:{image}", f"pkfunc:{ENTRY}", "launch:kernel:2:100:s0",
                    "pklaunch:1:64:1:128:300:kernel", "sync", "records",
                    env=daemon.env("best-effort", TALLY_BLOCKSCHED_PLAN=str(write_plan(tmp_path)),
                                   TALLY_PROFILE_FILE=str(saved_wave(tmp_path, 5)), TALLY_BLOCKSCHED_FLOOR="0",
                                   TALLY_RUN_AHEAD="1", TALLY_MAX_HOLD_MS="200"))
    daemon.sb.set_lane_completed(hp, 3, keep_hp_busy_completing(daemon.sb, hp, 0.6))
    r = app.finish()
    completed_ok(r)
    assert r.stderr == ""
    recs = records(r)
    first_slice = next(n for n, rec in enumerate(recs) if rec["name"].endswith("__tally_slice"))
    assert first_slice == 2 and all(not rec["name"].endswith("__tally_slice") for rec in recs[:2])
    (launch,) = slices_of(recs, (64, 1, 1))
    assert_exact_cover(launch, (64, 1, 1), r.values["pk_first_param"])


def test_after_long_hp_idleness_slices_are_sized_by_the_idle_depth(daemon, run_app, tmp_path):
    """HP idle for unthrottle_after: the gate bounds BE by the idle depth (2 ms), and so does
    slicing: a 2.4 ms kernel runs as 6-wave slices (not the 3 of a 1 ms budget), and a 1.2 ms one
    runs whole. (The second has another block shape, so the first's slices, timed on this
    machine, do not size it: its known whole time does.)"""
    profile = tmp_path / "profile"
    name = ENTRY.encode()
    profile.write_text(f"tally-profiles 1 2\n{fnv1a64(name):016x} {64 * 128} 2400000 5 {ENTRY}\n"
                       f"{fnv1a64(name):016x} {32 * 64} 1200000 5 {ENTRY}\n")
    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    daemon.sb.set_params(PolicyParams(idle_window_ns=0, turnaround_budget_ns=MS, unthrottle_after_ns=MS,
                                      daemon_timeout_ns=60 * 10**9))
    daemon.sb.hp_active = 1
    daemon.sb.hp_last_launch_ns = time.monotonic_ns() - 10**9  # an HP client, idle for a second
    r = run_app(f"load:data:{image}", f"pkfunc:{ENTRY}", "pklaunch:1:64:1:128:300:kernel",
                "pklaunch:1:32:1:64:300:kernel", "sync", "records",
                env=daemon.env("best-effort", TALLY_BLOCKSCHED_PLAN=str(write_plan(tmp_path)),
                               TALLY_PROFILE_FILE=str(profile), TALLY_BLOCKSCHED_FLOOR="0"))
    completed_ok(r)
    recs = records(r)
    (launch,) = slices_of(recs, (64, 1, 1))
    assert [rec["grid"][0] for rec in launch] == [48, 16]
    assert [rec["grid"] for rec in recs if rec["name"] == ENTRY] == [(32, 1, 1)]
    (kernel,) = r.stats()["blocksched"]["kernels"]
    assert kernel["budget_ns"] == 2 * MS and kernel["reason"] == "fits in one slice of the 2000 us bound"
    # the sliced share counts time admitted under the budget only: none here
    st = r.stats()["blocksched"]
    assert st["sliced_launches"] == 1 and st["sliced_est_ns"] == 0
    assert st["unsliced_launches"] == 0 and st["unsliced_est_ns"] == 0


def test_a_module_loaded_from_a_file_is_matched_by_its_bytes(daemon, run_app, tmp_path):
    """cuModuleLoad(path), as PyTorch Inductor loads torch.compile's kernels."""
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:2:64:1:128:200:kernel"], write_plan(tmp_path), api="file",
               budget_ns=500_000)
    completed_ok(r)
    recs = records(r)
    assert recs[0]["name"] == ENTRY + "__tally_slice" and slices_of(recs, (64, 1, 1))


@pytest.mark.parametrize("how", ["ex", "ptsz"])
def test_other_launch_entry_points_are_sliced_too(daemon, run_app, tmp_path, how):
    r = run_be(daemon, run_app, tmp_path, [f"pklaunch:4:64:1:128:500:{how}"], write_plan(tmp_path))
    completed_ok(r)  # for ex: fake_app fails if the caller's CUlaunchConfig was changed
    recs = records(r)
    launches = slices_of(recs, (64, 1, 1))
    # the first launch is sliced (one-wave slices); later ones too, unless a short estimate
    # on a busy machine says the kernel fits whole
    assert recs[0]["name"] == ENTRY + "__tally_slice"
    assert len(launches) + sum(rec["name"] == ENTRY for rec in recs) == 4
    for launch in launches:
        assert_exact_cover(launch, (64, 1, 1), r.values["pk_first_param"])
    if how == "ptsz":  # slices and their completion writes stay on the per-thread stream
        assert r.gpu("writes_ptds") == r.gpu("gpu_writes_issued") > 0


def test_a_kernel_that_fits_in_one_slice_runs_whole(daemon, run_app, tmp_path):
    # 2 waves, 0.6 ms whole (seeded, then learned), budget 5 ms: it fits in one slice (with room
    # for the learned estimate to err long on a busy machine).
    profile = tmp_path / "profile"
    profile.write_text(f"tally-profiles 1 1\n{fnv1a64(ENTRY.encode()):016x} {16 * 128} 600000 5 {ENTRY}\n")
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:4:16:1:128:300:kernel"], write_plan(tmp_path), budget_ns=5 * MS,
               env={"TALLY_PROFILE_FILE": str(profile)})
    completed_ok(r)
    assert [rec["name"] for rec in records(r)] == [ENTRY] * 4
    (kernel,) = r.stats()["blocksched"]["kernels"]
    assert kernel["reason"].startswith("fits in one slice of the ") and kernel["whole_launches"] == 4


def test_a_grid_of_one_wave_runs_whole(daemon, run_app, tmp_path):
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:2:8:1:128:300:kernel"], write_plan(tmp_path))
    completed_ok(r)
    assert [rec["name"] for rec in records(r)] == [ENTRY] * 2
    (kernel,) = r.stats()["blocksched"]["kernels"]
    assert kernel["reason"] == "one wave or less"


@pytest.mark.parametrize("how,why", [("extra", "arguments in extra"), ("attrs", "launch attributes")])
def test_launches_slicing_cannot_express_run_whole(daemon, run_app, tmp_path, how, why):
    r = run_be(daemon, run_app, tmp_path, [f"pklaunch:4:64:1:128:500:{how}"], write_plan(tmp_path))
    completed_ok(r)
    assert {rec["name"] for rec in records(r)} == {ENTRY}, why
    assert r.stderr == ""


def test_without_a_high_priority_client_nothing_is_sliced(daemon, run_app, tmp_path):
    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    daemon.sb.hp_active = 0
    r = run_app(f"load:data:{image}", f"pkfunc:{ENTRY}", "pklaunch:4:64:1:128:200:kernel", "sync", "records",
                env=daemon.env("best-effort", TALLY_BLOCKSCHED_PLAN=str(write_plan(tmp_path))))
    completed_ok(r)
    assert {rec["name"] for rec in records(r)} == {ENTRY}
    assert r.stats()["blocksched"]["sliced_launches"] == 0


@pytest.mark.parametrize("case", ["other-image", "other-entry", "no-plan"])
def test_kernels_not_in_the_plan_run_whole_silently(daemon, run_app, tmp_path, case):
    plan = {"other-image": lambda: write_plan(tmp_path, image=PTX + b"\n"),
            "other-entry": lambda: write_plan(tmp_path, entry="k2"),
            "no-plan": lambda: None}[case]()
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:4:64:1:128:500:kernel"], plan)
    completed_ok(r)
    assert {rec["name"] for rec in records(r)} == {ENTRY}
    assert r.stderr == ""
    if plan:
        assert r.stats()["blocksched"]["not_in_plan"] >= 1


@pytest.mark.parametrize("case,fragment", [
    ("cubin-hash", "is not the cubin the plan names"),
    ("cubin-missing", "cannot read"),
    ("param-count", "other parameters than the plan's 3"),
])
def test_a_slice_kernel_that_does_not_check_out_runs_whole_with_one_warning(daemon, run_app, tmp_path, case,
                                                                             fragment):
    plan = write_plan(tmp_path, cubin_hash=0x1234 if case == "cubin-hash" else None,
                      nparams=3 if case == "param-count" else 2)
    if case == "cubin-missing":
        for cubin in (tmp_path / "cubins").iterdir():
            cubin.unlink()
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:4:64:1:128:500:kernel"], plan)
    completed_ok(r)
    assert {rec["name"] for rec in records(r)} == {ENTRY}
    assert len(r.stderr_lines) == 1 and fragment in r.stderr_lines[0], r.stderr
    assert r.stderr_lines[0].startswith("tally: warning: block-level scheduling: ")
    (kernel,) = r.stats()["blocksched"]["kernels"]
    assert not kernel["usable"] and fragment in kernel["reason"]


@pytest.mark.parametrize("text,fragment", [
    ("tally-blocksched-plan 2\n", "not a tally plan of version 1"),
    ("tally-blocksched-plan 1\nslice 12 k 2 0000000000000001 /x\n", "malformed image hash"),
    ("tally-blocksched-plan 1\nslice 0000000000000001 k 2 0000000000000001 relative/x\n", "relative path"),
    ("tally-blocksched-plan 1\nslice 0000000000000001 k 2 0000000000000001 /x", "truncated"),
    ("tally-blocksched-plan 1\nslice 0000000000000001 k many 0000000000000001 /x\n", "bad parameter count"),
])
def test_a_bad_plan_is_ignored_with_one_warning(daemon, run_app, tmp_path, text, fragment):
    plan = tmp_path / "bad-plan"
    plan.write_text(text)
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:3:64:1:128:300:kernel"], plan)
    completed_ok(r)
    assert {rec["name"] for rec in records(r)} == {ENTRY}
    assert len(r.stderr_lines) == 1 and fragment in r.stderr_lines[0], r.stderr
    assert "blocksched" not in r.stats()


def test_unknown_modes_in_the_plan_are_skipped(daemon, run_app, tmp_path):
    plan = write_plan(tmp_path)
    plan.write_text(plan.read_text() + "preemptible 0000000000000001 k 2 0000000000000001 /x y\n")
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:4:64:1:128:500:kernel"], plan)
    completed_ok(r)
    recs = records(r)
    assert recs[0]["name"] == ENTRY + "__tally_slice" and slices_of(recs, (64, 1, 1))
    assert r.stats()["blocksched"]["plan_kernels"] == 1


def test_an_unloaded_module_is_forgotten(daemon, run_app, tmp_path):
    """After cuModuleUnload the module's functions no longer resolve to the plan; the same
    image loaded again does."""
    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    throttle_be(daemon.sb, 1_200_000)
    r = run_app(f"load:data:{image}", f"pkfunc:{ENTRY}", "pklaunch:3:64:1:128:500:kernel", "pkunload", "mark:unload",
                "pklaunch:2:64:1:128:500:kernel", "mark:reload", f"load:data:{image}", f"pkfunc:{ENTRY}",
                "pklaunch:2:64:1:128:500:kernel", "sync", "records",
                env=daemon.env("best-effort", TALLY_BLOCKSCHED_PLAN=str(write_plan(tmp_path))))
    completed_ok(r)
    recs = records(r)
    unload, reload = int(r.values["mark_unload"]), int(r.values["mark_reload"])
    assert recs[0]["name"] == ENTRY + "__tally_slice"
    # the launches through the old function run whole (the fake driver keeps it usable;
    # the agent must not trust what it resolved through the unloaded module)
    assert [rec["name"] for rec in recs[unload:reload]] == [ENTRY, ENTRY]
    # the module loaded again (a new handle, the same image) is matched again
    assert recs[reload]["name"] == ENTRY + "__tally_slice"
    assert r.stats()["blocksched"]["not_in_plan"] >= 2


def be_client_counters(daemon, spawn_app, tmp_path, launch: str, budget_ns: int):
    """Runs the planned kernel's launches (`launch`: a pklaunch step) and returns (the client's
    scoreboard counters as they were before exit, the finished run)."""
    from test_sched import inspect_while_alive

    image = tmp_path / "k.ptx"
    image.write_bytes(PTX)
    throttle_be(daemon.sb, budget_ns)
    (client, _), r = inspect_while_alive(
        daemon, spawn_app, tmp_path, [f"load:data:{image}", f"pkfunc:{ENTRY}", launch, "sync", "records"],
        "best-effort", env={"TALLY_BLOCKSCHED_PLAN": str(write_plan(tmp_path))})
    completed_ok(r)
    return client, r


def test_the_scoreboard_counts_sliced_launches_for_tally_status(daemon, spawn_app, tmp_path):
    client, r = be_client_counters(daemon, spawn_app, tmp_path, "pklaunch:3:64:1:128:200:kernel", 500_000)
    sliced = len(slices_of(records(r), (64, 1, 1)))
    assert sliced >= 1 and client["sliced_launches"] == sliced == r.stats()["blocksched"]["sliced_launches"]


def test_slices_count_once_per_launch_in_the_gate_counters(daemon, spawn_app, tmp_path):
    """A wave longer than the budget: every one-wave slice is admitted alone and waits for
    the one before it, but long_kernels and held_launches count the program's launches."""
    client, r = be_client_counters(daemon, spawn_app, tmp_path, "pklaunch:3:64:1:128:300:kernel", 100_000)
    launches = slices_of(records(r), (64, 1, 1))
    assert [len(launch) for launch in launches] == [8, 8, 8]  # one wave a slice: a wave exceeds the budget
    # (at most one each per launch; whether a slice is "alone" depends on its learned estimate)
    assert client["long_kernels"] <= 3 and 1 <= client["held_launches"] <= 3
    assert client["launches"] == 3 and client["sliced_launches"] == 3


def test_a_raised_shared_memory_limit_is_carried_over_to_the_slice_kernel(daemon, run_app, tmp_path):
    """Over 48 KiB of dynamic shared memory needs cuFuncSetAttribute on the launched function
    (Triton's large tiles); the slice kernel must get the same, or its launches fail."""
    r = run_be(daemon, run_app, tmp_path, ["pksmem:100000", "pklaunch:2:64:1:128:200:kernel"],
               write_plan(tmp_path), budget_ns=500_000)
    completed_ok(r)
    recs = records(r)
    assert recs[0]["name"] == ENTRY + "__tally_slice" and slices_of(recs, (64, 1, 1))
    assert r.stderr == ""


@pytest.mark.parametrize("floor,whole_later", [(None, True), ("0.01", False)])
def test_slices_much_slower_than_the_kernel_run_it_whole(daemon, run_app, tmp_path, floor, whole_later):
    """The whole kernel's time is known (seeded) and its slices turn out 4x slower per wave:
    under the floor (default 0.5) the kernel runs whole, with the reason; a floor of 0.01
    accepts them (0.1 was too close to what a busy machine's timing can make of 0.25)."""
    profile = tmp_path / "profile"
    # 64 blocks = 8 waves of 0.3 ms: 2.4 ms whole; budget 1 ms: the first launch is 3-wave slices
    profile.write_text(f"tally-profiles 1 1\n{fnv1a64(ENTRY.encode()):016x} {64 * 128} 2400000 5 {ENTRY}\n")
    env = {"TALLY_PROFILE_FILE": str(profile), "FAKE_CUDA_SLICE_SLOWDOWN": "4"}
    if floor:
        env["TALLY_BLOCKSCHED_FLOOR"] = floor
    r = run_be(daemon, run_app, tmp_path, ["pklaunch:6:64:1:128:300:kernel"], write_plan(tmp_path), budget_ns=MS,
               env=env)
    completed_ok(r)
    recs = records(r)
    assert recs[0]["name"] == ENTRY + "__tally_slice"
    (kernel,) = r.stats()["blocksched"]["kernels"]
    if whole_later:
        assert recs[-1]["name"] == ENTRY and kernel["whole_launches"] >= 1
        assert "under the floor 0.50x" in kernel["reason"]
    else:
        assert kernel["whole_launches"] == 0 and kernel["sliced_launches"] == 6
