"""The per-program decisions file: round trip, versioning, corruption; and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from tally.blocksched import _files, decisions
from tally.blocksched.choose import KernelRecord, Measurement
from tally.blocksched.cli import blocksched_group
from tally.errors import TallyError

T = 1_000_000.0


def records():
    return [
        KernelRecord("_Z5saxpyifPfS_", (4096, 1, 1), (256, 1, 1), 132, True, {},
                     (Measurement("original", T, 5), Measurement("preemptible:264", T / 0.92, 5),
                      Measurement("preemptible:132", T / 0.6, 5, None, 20_000.0),
                      Measurement("slice:264", T / 0.97, 5, 120_000.0))),
        KernelRecord("grid_sync", (4096, 1, 1), (256, 1, 1), 132, True,
                     {m: "grid-wide sync or cooperative launch (reads %envreg1)" for m in ("slice", "ptb", "preemptible")},
                     (Measurement("original", T, 5),)),
        KernelRecord("ampere_sgemm_128x64_nn", (64, 64, 1), (128, 1, 1), 132, False),
    ]


@pytest.fixture(autouse=True)
def fresh_warnings():
    _files.reset_warnings()
    yield


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "prog.json"
    decisions.write(path, decisions.decide(records()))
    return path


def test_round_trip(good):
    entries = decisions.read(good)
    assert [e.record for e in entries] == sorted(records(), key=lambda r: (r.name, list(r.grid), list(r.block)))
    by_name = {e.record.name: e.decision.reason for e in entries}
    assert by_name["_Z5saxpyifPfS_"] == "preemptible w=264: 0.92x speed, est. preemption 34 us <= 100 us"
    assert by_name["grid_sync"].startswith("original: kernel refused by tally.ptx: grid-wide sync")
    assert by_name["ampere_sgemm_128x64_nn"] == "original: no PTX"
    assert decisions.dumps(entries) == good.read_bytes()  # canonical


def _edit(fn):
    def apply(data):
        doc = json.loads(data)
        fn(doc)
        return json.dumps(doc).encode()
    return apply


def _rechecksum(fn):
    def apply(data):
        doc = json.loads(data)
        fn(doc)
        doc["checksum"] = _files.sha256_hex(_files.canonical_json(doc["kernels"]))
        return json.dumps(doc).encode()
    return apply


BAD = {
    "empty": (lambda d: b"", "not JSON"),
    "truncated": (lambda d: d[: len(d) // 2], "not JSON"),
    "bit-flip-in-a-number": (lambda d: d.replace(b'"samples":5', b'"samples":6', 1), "checksum mismatch"),
    "version-2": (_edit(lambda doc: doc.update(version=2)), "format version 2"),
    "foreign": (lambda d: b'{"format": "something-else", "version": 1}', "not a tally block scheduling file"),
    "profile-file": (lambda d: b"tally-profiles 1 0\n", "not JSON"),
    "list": (lambda d: b"[]", "not a tally block scheduling file"),
    "nan": (lambda d: d.replace(b'"time_ns":1000000.0', b'"time_ns":NaN', 1), "not JSON"),
    "duplicate-json-key": (lambda d: d.replace(b'{"checksum"', b'{"checksum":"x","checksum"', 1), "not JSON"),
    "extra-field": (_rechecksum(lambda doc: doc["kernels"][0].update(extra=1)), "kernel 1"),
    "negative-time": (_rechecksum(lambda doc: doc["kernels"][0]["measurements"][0].update(time_ns=-1.0)), "kernel 1"),
    "bool-samples": (_rechecksum(lambda doc: doc["kernels"][0]["measurements"][0].update(samples=True)), "kernel 1"),
    "bad-config": (_rechecksum(lambda doc: doc["kernels"][0]["measurements"][0].update(config="warp:2")), "kernel 1"),
    "bad-decision": (_rechecksum(lambda doc: doc["kernels"][0]["decision"].update(config="slice:0")), "kernel 1"),
    "grid-2d": (_rechecksum(lambda doc: doc["kernels"][0].update(grid=[1, 2])), "kernel 1"),
    "name-newline": (_rechecksum(lambda doc: doc["kernels"][0].update(name="a\nb")), "kernel 1"),
    "unknown-mode-refusal": (_rechecksum(lambda doc: doc["kernels"][0]["refusals"].update(warp="x")), "kernel 1"),
    "listed-twice": (_rechecksum(lambda doc: doc["kernels"].append(doc["kernels"][0])), "listed twice"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_untrusted_files(good, capsys, name):
    mutate, fragment = BAD[name]
    good.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(TallyError) as exc:
        decisions.read(good)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert decisions.load(good) == [] and decisions.load(good) == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tally: warning: ") and err[0].endswith("; ignored")


def test_missing_file(tmp_path):
    assert decisions.read(tmp_path / "none.json") == [] == decisions.load(tmp_path / "none.json")
    with pytest.raises(TallyError, match="no block scheduling file"):
        decisions.read(tmp_path / "none.json", missing_ok=False)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=3000),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=5),
                              max_leaves=30).map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"format": st.just("tally-blocksched"), "version": st.just(1),
                                        "checksum": st.text(max_size=64), "kernels": st.lists(st.dictionaries(
                                            st.sampled_from(["name", "grid", "block", "sms", "decision"]),
                                            st.integers() | st.text(max_size=5)), max_size=3)})
                 .map(lambda v: json.dumps(v).encode())))
def test_junk_raises_only_tally_errors(junk):
    try:
        decisions.parse(junk)
    except TallyError as exc:
        assert "\n" not in str(exc)


def test_decisions_path_is_named_like_the_profile_file(tmp_path, monkeypatch):
    from tally.profiles import profile_path

    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path))
    cmd = ["python", "train.py", "--epochs", "3"]
    assert decisions.decisions_path(cmd) == tmp_path / "blocksched" / (profile_path(cmd).stem + ".json")


# ------------------------------------------------------------------ CLI


def invoke(*args, env=None):
    return CliRunner().invoke(blocksched_group, list(args), env=env, catch_exceptions=True)


def test_show(good):
    r = invoke("show", "--file", str(good))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"{good}: 3 kernel configuration(s)"
    assert "saxpy(int, float, float*, float*)  grid 4096x1x1 block 256x1x1: preemptible w=264: 0.92x speed" in r.output
    assert "original: no PTX" in r.output


def test_show_rechooses_under_another_bound(good):
    r = invoke("show", "--file", str(good), "--bound-us", "31.6", "-v")
    assert r.exit_code == 0, r.output
    assert "re-chosen with bound 32 us and floor 0.5x" in r.output
    assert "preemptible w=132: 0.60x speed, measured p99 preemption 20 us <= 32 us" in r.output
    assert "    slice n=16 (264 blocks each): 0.97x speed, measured slice time 120 us > 32 us" in r.output


def test_candidates_and_cache_commands(tmp_path):
    r = invoke("candidates", "--grid", "4096", "--block", "256", "--sms", "132", "--occupancy", "2")
    assert r.exit_code == 0 and r.output.splitlines() == [
        "original             1 launch of 4096x1x1",
        "preemptible:132      1 launch of 132 workers, <= 32 blocks each",
        "ptb:132              1 launch of 132 workers, <= 32 blocks each",
        "slice:132            32 launches of <= 132 blocks",
        "preemptible:264      1 launch of 264 workers, <= 16 blocks each",
        "ptb:264              1 launch of 264 workers, <= 16 blocks each",
        "slice:264            16 launches of <= 264 blocks"]
    env = {"TALLY_CACHE_DIR": str(tmp_path)}
    r = invoke("cache", env=env)
    assert r.exit_code == 0 and "0 transformed, 0 refused" in r.output
    r = invoke("cache", "--clear", env=env)
    assert r.exit_code == 0 and "removed" in r.output


def tally(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "tally", *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("args, fragment", [
    (["blocksched", "show"], "which program?"),
    (["blocksched", "show", "--file", "/nonexistent/x.json"], "no block scheduling file"),
    (["blocksched", "show", "--file", "{corrupt}"], "checksum mismatch"),
    (["blocksched", "show", "--file", "{good}", "--bound-us", "0"], "bound must be positive"),
    (["blocksched", "show", "--file", "{good}", "--floor", "2"], "floor must be in"),
    (["blocksched", "show", "--file", "{good}", "--", "python", "x.py"], "not both"),
    (["blocksched", "candidates", "--grid", "0", "--block", "256", "--sms", "132"], "--grid must be"),
    (["blocksched", "candidates", "--grid", "64", "--block", "a", "--sms", "132"], "--block must be"),
    (["blocksched", "candidates", "--grid", "64", "--block", "32"], "Missing option"),
    (["blocksched", "frob"], "No such command"),
])
def test_errors_are_one_line(good, tmp_path, args, fragment):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_bytes(good.read_bytes().replace(b'"samples":5', b'"samples":7', 1))
    args = [a.replace("{good}", str(good)).replace("{corrupt}", str(corrupt)) for a in args]
    r = tally(*args, env_extra={"TALLY_CACHE_DIR": str(tmp_path)})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tally: error: ") and fragment in lines[0], r.stderr
