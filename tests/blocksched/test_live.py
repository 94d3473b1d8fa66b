"""What the agent did with the plan in a live run (tally.blocksched.live) and `tally blocksched show`'s
report of it. The agent's side (the counters in its stats file) is tested in tests/agent/test_blocksched.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tally.blocksched import _files, live
from tally.blocksched.cli import blocksched_group
from tally.errors import TallyError

SLICED = {"entry": "_Z4stepPfi", "image": "00000000000000aa", "sliced_launches": 10, "slices": 40,
          "whole_launches": 2, "waves_per_slice": 3, "wave_blocks": 264, "wave_ns": 31_000, "budget_ns": 100_000,
          "usable": True, "reason": "fits in one slice"}
BROKEN = {"entry": "other", "image": "00000000000000bb", "sliced_launches": 0, "slices": 0, "whole_launches": 5,
          "waves_per_slice": 0, "wave_blocks": 0, "wave_ns": 0, "budget_ns": 0, "usable": False,
          "reason": "the slice cubin does not match the plan's hash"}


def stats(*kernels, plan=True) -> bytes:
    body = {"pid": 1, "kernel_launches": 12}
    if plan:
        body["blocksched"] = {"plan": "/p", "sliced_launches": 10, "kernels": list(kernels)}
    return json.dumps(body).encode()


def test_parse_reads_the_agents_per_kernel_counters():
    sliced, broken = live.parse(stats(SLICED, BROKEN), "f")
    assert (sliced.entry, sliced.slices, sliced.waves_per_slice, sliced.wave_ns) == ("_Z4stepPfi", 40, 3, 31_000)
    assert sliced.describe() == ("sliced 10 launch(es), 4.0 slices each, last of 3 wave(s) = 792 blocks "
                                 "(budget 100 us / 31.0 us a wave); 2 whole: fits in one slice")
    assert broken.describe() == "not sliced: the slice cubin does not match the plan's hash; 5 whole"
    assert live.parse(stats(plan=False), "f") is None
    # an agent from before the configuration fields
    old = {k: v for k, v in SLICED.items() if k not in ("waves_per_slice", "wave_blocks", "wave_ns", "budget_ns")}
    (k,) = live.parse(stats(old), "f")
    assert k.wave_ns == 0 and "no wave time known yet" in k.describe()


@pytest.mark.parametrize("data, fragment", [
    (b"{", "not a stats file"),
    (b"[1]", "not a JSON object"),
    (b'{"blocksched": {"kernels": 3}}', "no kernel list"),
    (stats({**SLICED, "entry": ""}), "no entry name"),
    (stats({**SLICED, "slices": -1}), "slices is not a count"),
    (stats({**SLICED, "wave_ns": 1.5}), "wave_ns is not a count"),
    (stats({**SLICED, "usable": 1}), "usable is not true or false"),
    (stats({**SLICED, "reason": None}), "no image or reason"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": NaN}', "not a stats file"),
])
def test_parse_refuses_what_is_out_of_place(data, fragment):
    with pytest.raises(TallyError, match=fragment):
        live.parse(data, "f")


def test_a_directory_merges_processes_and_skips_bad_files(tmp_path, capsys):
    _files.reset_warnings()
    (tmp_path / "stats-1.json").write_bytes(stats(SLICED))
    later = {**SLICED, "sliced_launches": 1, "slices": 8, "waves_per_slice": 1, "reason": ""}
    (tmp_path / "stats-2.json").write_bytes(stats(later, BROKEN))
    (tmp_path / "stats-3.json").write_bytes(stats(plan=False))  # a child that ran without a plan
    (tmp_path / "stats-4.json").write_bytes(b"garbage")
    os.utime(tmp_path / "stats-1.json", (1, 1))  # oldest: the later file's configuration wins
    kernels, processes = live.read(tmp_path)
    assert processes == 2
    step, other = kernels
    assert (step.sliced_launches, step.slices, step.whole_launches) == (11, 48, 4)
    assert step.waves_per_slice == 1 and step.reason == "fits in one slice"
    assert not other.usable and other.whole_launches == 5
    err = capsys.readouterr().err
    assert err.count("tally: warning:") == 1 and "stats-4.json" in err and "ignored" in err
    with pytest.raises(TallyError, match="not a stats file"):
        live.read(tmp_path / "stats-4.json")  # named on its own: an error, not a warning


def invoke(*args, env=None):
    return CliRunner().invoke(blocksched_group, list(args), env=env, catch_exceptions=True)


def test_show_reports_the_commands_last_block_level_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path))
    command = ["python", "train.py"]
    directory = live.live_dir(command)
    live.start_run(directory)
    (directory / "stats-7.json").write_bytes(stats(SLICED))
    r = invoke("show", "--", *command)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"{directory}: last block-level run, 1 process(es) with a plan, 1 planned kernel(s) launched"
    assert lines[1].startswith("step(float*, int): sliced 10 launch(es), 4.0 slices each")
    r = invoke("show", "--live", str(directory / "stats-7.json"))
    assert r.exit_code == 0 and r.output.splitlines()[1] == lines[1]


def tally(*args, env):
    return subprocess.run([sys.executable, "-m", "tally", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env))


@pytest.mark.parametrize("args, fragment", [
    (["--", "python", "never-ran.py"], "no block scheduling records for this program"),
    (["--live", "/nonexistent/stats"], "no stats file or directory /nonexistent/stats"),
    (["--live", "{bad}"], "not a stats file"),
])
def test_show_errors_are_one_line(tmp_path, args, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = tally("blocksched", "show", *[a.replace("{bad}", str(bad)) for a in args],
              env={"TALLY_CACHE_DIR": str(tmp_path)})
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("tally: error: ") and fragment in r.stderr
