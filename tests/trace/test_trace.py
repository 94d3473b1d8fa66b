"""`tally trace`: merging the agent's raw per-process files, reading traces
(malformed ones are one-line errors), summaries and kernel profiles."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from tally import trace
from tally.errors import TallyError

MANGLED = "_Z6kernelPfi"


def kernel(name=MANGLED, start=0, dur=1000, grid=(1, 1, 1), block=(32, 1, 1)):
    return {"type": "kernel", "name": name, "grid": list(grid), "block": list(block), "static_smem": 0,
            "dynamic_smem": 0, "registers": 16, "device": 0, "context": 1, "stream": 7, "correlation": 1,
            "start_ns": start, "end_ns": start + dur}


def write_raw(tmp_path, pid, records, stats=None, torn=False):
    lines = [json.dumps(r) for r in records]
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"type":"kernel","name":"_Z4tor'
    (tmp_path / f"trace-{pid}.jsonl").write_text(text)
    if stats is not None:
        (tmp_path / f"stats-{pid}.json").write_text(json.dumps(stats))


def test_merge_demangles_adds_pid_and_duration(tmp_path):
    write_raw(tmp_path, 11, [kernel(dur=2500)], {"pid": 11, "kernel_launches": 1, "graph_launches": 0})
    write_raw(tmp_path, 12, [kernel(name="plain_c_kernel", dur=10),
                             {"type": "graph_launch", "correlation": 3, "graph_exec": "0x1", "stream": "0x2"}],
              {"pid": 12, "kernel_launches": 1, "graph_launches": 1}, torn=True)
    out = io.StringIO()
    counts = trace.merge_raw_trace(tmp_path, out, ["python", "x.py"], 3)
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert recs[0]["type"] == "meta" and recs[0]["exit_code"] == 3 and recs[0]["command"] == ["python", "x.py"]
    kernels = [r for r in recs if r["type"] == "kernel"]
    assert [(k["pid"], k["name"], k["mangled"], k["duration_ns"]) for k in kernels] == [
        (11, "kernel(float*, int)", MANGLED, 2500),
        (12, "plain_c_kernel", "plain_c_kernel", 10),
    ]
    assert counts == {"kernels": 2, "graph_launches": 1, "processes": 2, "unreadable_lines": 1}
    assert sum(r["type"] == "process" for r in recs) == 2


def test_read_trace_rejects_malformed_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "meta"}) + "\n{not json\n")
    with pytest.raises(TallyError, match=r"bad.jsonl:2: not a tally trace line"):
        list(trace.read_trace(bad))
    bad.write_text('[1, 2]\n')
    with pytest.raises(TallyError, match=r":1: not a tally trace record"):
        list(trace.read_trace(bad))
    bad.write_text('{"type": "kernel", "name": "k"}\n')
    with pytest.raises(TallyError, match="lacks start_ns, end_ns"):
        list(trace.read_trace(bad))


def test_summary_ranks_by_gpu_time_and_buckets_durations():
    recs = [kernel("a", dur=5_000) for _ in range(10)]            # 50 us, < 10 us each
    recs += [kernel("b", dur=2_000_000) for _ in range(2)]         # 4 ms, 1-10 ms
    recs += [kernel("c", dur=60_000)]                              # 10-100 us
    recs += [{"type": "process", "kernel_launches": 13, "graph_launches": 2}]
    s = trace.summarize(recs)
    assert [k.name for k in s.top(3)] == ["b", "c", "a"]
    assert s.histogram == [10, 1, 0, 2, 0]
    assert (s.kernel_records, s.kernel_launches, s.graph_launches, s.processes) == (13, 13, 2, 1)
    assert s.total_ns == 10 * 5_000 + 2 * 2_000_000 + 60_000
    j = trace.summary_json(s, 2)
    assert [t["name"] for t in j["top"]] == ["b", "c"]


def test_kernel_profiles_per_name_grid_and_block():
    recs = [kernel(dur=100, grid=(4, 1, 1)), kernel(dur=300, grid=(4, 1, 1)), kernel(dur=50, grid=(8, 1, 1))]
    for r in recs:
        r["mangled"] = r["name"]
    profiles = trace.kernel_profiles(recs)
    assert profiles[(MANGLED, (4, 1, 1), (32, 1, 1))] == {"count": 2, "mean_ns": 200.0, "max_ns": 300}
    assert profiles[(MANGLED, (8, 1, 1), (32, 1, 1))]["count"] == 1


def test_summary_command_prints_table_and_json(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"type": "meta"}, kernel(), kernel("other", dur=9)]) + "\n")
    r = subprocess.run([sys.executable, "-m", "tally", "trace", "--summary", str(path), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kernels_executed"] == 2
    r = subprocess.run([sys.executable, "-m", "tally", "trace", "--summary", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "Top 20 kernels" in r.stdout and "_Z6kernelPfi" in r.stdout


def test_trace_of_a_program_without_cuda_keeps_its_exit_code(tmp_path):
    out = tmp_path / "t.jsonl"
    r = subprocess.run([sys.executable, "-m", "tally", "trace", "-o", str(out), "--", "sh", "-c", "exit 5"],
                       capture_output=True, text=True)
    assert r.returncode == 5
    assert "no CUDA process reported in" in r.stderr
    meta = json.loads(out.read_text().splitlines()[0])
    assert meta["exit_code"] == 5


def test_demangling_without_cxxfilt_keeps_mangled_names_with_one_warning(monkeypatch, capsys):
    import builtins

    from tally import trace as trace_mod

    real_import = builtins.__import__

    def no_cxxfilt(name, *args, **kwargs):
        if name == "cxxfilt":
            raise ImportError("no cxxfilt")
        return real_import(name, *args, **kwargs)

    trace_mod._cxxfilt.cache_clear()
    trace_mod.demangle.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_cxxfilt)
    try:
        assert trace_mod.demangle("_Z6kernelPf") == "_Z6kernelPf"
        assert trace_mod.demangle("_Z5otheri") == "_Z5otheri"
    finally:
        trace_mod._cxxfilt.cache_clear()
        trace_mod.demangle.cache_clear()
    assert capsys.readouterr().err.count("cxxfilt package is missing") == 1


def test_summary_shows_the_block_level_choice_of_the_traced_program(tmp_path, monkeypatch):
    """`tally trace --summary` joins the traced program's block scheduling decisions by kernel;
    a kernel with no decision shows '-', and without a decisions file there is no column."""
    from tally.blocksched import decisions
    from tally.blocksched.choose import Decision, KernelRecord

    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path / "cache"))
    command = ["/bin/true", "train.py"]
    demangled = trace.demangle(MANGLED)
    recs = [{"type": "meta", "command": command}, {**kernel(dur=5_000), "name": demangled, "mangled": MANGLED},
            {**kernel(dur=9), "name": "other", "mangled": "other"}]
    s = trace.summarize(recs)
    assert s.command == command and trace.block_level(s) == {}  # no decisions file yet
    record = KernelRecord(MANGLED, (1, 1, 1), (32, 1, 1), 132)
    decisions.write(decisions.decisions_path(command),
                    [decisions.Entry(record, Decision("original", "original: kernel time 5 us <= 100 us"))])
    assert trace.block_level(s) == {demangled: "original: kernel time 5 us <= 100 us"}
    j = trace.summary_json(s, 5)
    assert [t.get("block_level") for t in j["top"]] == ["original: kernel time 5 us <= 100 us", None]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    r = subprocess.run([sys.executable, "-m", "tally", "trace", "--summary", str(path)], capture_output=True,
                       text=True, env={**__import__("os").environ, "TALLY_CACHE_DIR": str(tmp_path / "cache"),
                                       "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert "block level" in r.stdout and "original: kernel time 5 us" in r.stdout
    # what the agent did in the program's last block-level run joins the offline choice
    from tally.blocksched import live

    directory = live.live_dir(command)
    live.start_run(directory)
    (directory / "stats-9.json").write_text(json.dumps({"blocksched": {"kernels": [
        {"entry": "other", "image": "00000000000000aa", "sliced_launches": 0, "slices": 0, "whole_launches": 3,
         "usable": True, "reason": "one wave or less"}]}}))
    assert trace.block_level(s) == {demangled: "original: kernel time 5 us <= 100 us",
                                    "other": "last block-level run: 3 whole: one wave or less"}
