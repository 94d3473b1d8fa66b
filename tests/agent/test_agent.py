"""Behavioural tests of the native agent (agent/tally_agent.c) on the CPU.

The real agent is injected, through CUDA_INJECTION64_PATH, into a fake CUDA
application whose libcuda and libcupti are test doubles (tests/agent/doubles/):
the fake driver's cuInit loads the agent as the real driver does, and the fake
CUPTI delivers callbacks and kernel activity records with the real CUDA 13.0
ids, names, parameter blocks and record layouts. What is checked is what the
agent writes (stats-<pid>.json, trace-<pid>.jsonl, stderr) and that the
application itself is never disturbed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

DOUBLES = Path(__file__).parent / "doubles"

# (fake_app entry, driver API, what the agent must count it as, kernel records per call)
ENTRIES = [
    ("kernel", "cuLaunchKernel", "kernel", 1),
    ("kernel_ptsz", "cuLaunchKernel_ptsz", "kernel", 1),
    ("ex", "cuLaunchKernelEx", "kernel", 1),
    ("ex_ptsz", "cuLaunchKernelEx_ptsz", "kernel", 1),
    ("coop", "cuLaunchCooperativeKernel", "kernel", 1),
    ("coop_ptsz", "cuLaunchCooperativeKernel_ptsz", "kernel", 1),
    ("coop_multi", "cuLaunchCooperativeKernelMultiDevice", "kernel", 2),  # one kernel per device
    ("legacy", "cuLaunch", "kernel", 1),
    ("grid", "cuLaunchGrid", "kernel", 1),
    ("grid_async", "cuLaunchGridAsync", "kernel", 1),
    ("graph", "cuGraphLaunch", "graph", 2),  # the fake graph has two kernel nodes
    ("graph_ptsz", "cuGraphLaunch_ptsz", "graph", 2),
    ("host", "cuLaunchHostFunc", "host", 0),
    ("host_ptsz", "cuLaunchHostFunc_ptsz", "host", 0),
]
API = {entry: api for entry, api, _, _ in ENTRIES}
KIND = {api: kind for _, api, kind, _ in ENTRIES}
RECORDS = {api: n for _, api, _, n in ENTRIES}

# Every kernel- and graph-launch entry point of CUDA 13.0 (cupti_driver_cbid.h).
LAUNCH_NAMES = {
    "cuLaunchKernel", "cuLaunchKernel_ptsz", "cuLaunchKernelEx", "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel_ptsz",
    "cuLaunchCooperativeKernelMultiDevice", "cuLaunch", "cuLaunchGrid", "cuLaunchGridAsync",
    "cuGraphLaunch", "cuGraphLaunch_ptsz",
}
TRACE_KEYS = {"type", "name", "grid", "block", "static_smem", "dynamic_smem", "registers", "device",
              "context", "stream", "correlation", "start_ns", "end_ns"}
WARNING = re.compile(r"^tally: warning: .+")


def driver_cbid_table() -> dict[int, str]:
    text = (DOUBLES / "driver_cbid_names.h").read_text()
    return {int(i): name for name, i in re.findall(r'"(\w+)", /\* (\d+) \*/', text)}


def expected_stats(called: dict[str, int]) -> tuple[dict[str, int], int, int]:
    """by_entry_point, kernel_launches, graph_launches the agent must report."""
    by_entry = {api: n for api, n in called.items() if KIND[api] != "host" and n}
    kernels = sum(n for api, n in by_entry.items() if KIND[api] == "kernel")
    graphs = sum(n for api, n in by_entry.items() if KIND[api] == "graph")
    return by_entry, kernels, graphs


def assert_counts(stats: dict, called: dict[str, int]) -> None:
    by_entry, kernels, graphs = expected_stats(called)
    assert stats["by_entry_point"] == by_entry
    assert stats["kernel_launches"] == kernels
    assert stats["graph_launches"] == graphs
    # Only launch callbacks are enabled: each launch is one ENTER and one EXIT.
    assert stats["callbacks"] == 2 * (kernels + graphs)


def assert_app_completed(r, returncode: int = 0) -> None:
    assert r.returncode == returncode, r.stderr
    if returncode == 0:
        assert "fake_app: done" in r.stdout


def assert_one_warning(r, *fragments: str) -> str:
    lines = r.stderr_lines
    assert len(lines) == 1 and WARNING.match(lines[0]), f"stderr was {lines!r}"
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def thread_mix_counts(threads: int, per_thread: int) -> dict[str, int]:
    """What fake_app's threads:T:M step calls: thread t's launch j uses entry (t + j) % 14."""
    n = len(ENTRIES)
    counts = Counter()
    for t in range(threads):
        for e, (_, api, _, _) in enumerate(ENTRIES):
            counts[api] += per_thread // n + (1 if (e - t) % n < per_thread % n else 0)
    return dict(counts)


# ------------------------------------------------------------ accounting

def test_counts_each_entry_point_exactly(run_app, doubles):
    steps = [f"launch:{entry}:{3 + i}" for i, (entry, _, _, _) in enumerate(ENTRIES)]
    r = run_app(*steps)
    assert_app_completed(r)
    expected_called = {api: 3 + i for i, (_, api, _, _) in enumerate(ENTRIES)}
    assert r.called == expected_called
    assert int(r.values["host_func_runs"]) == 15 + 16  # host funcs ran, but are no kernels
    stats = r.stats()
    assert stats["active"] is True and stats["failopen_reason"] == ""
    assert stats["pid"] == r.pid
    assert stats["cupti"] == str(doubles.cupti)
    assert_counts(stats, expected_called)
    assert "cuLaunchHostFunc" not in stats["by_entry_point"]
    assert "cuLaunchHostFunc_ptsz" not in stats["by_entry_point"]
    assert r.stderr == ""


def test_subscribes_every_launch_entry_point_by_name(run_app):
    table = driver_cbid_table()
    assert sorted(table) == list(range(1, 807))
    # The real table holds exactly these launch entry points (plus cuLaunchHostFunc*, host code).
    launchy = {n for n in table.values() if n.startswith(("cuLaunch", "cuGraphLaunch"))}
    assert launchy - LAUNCH_NAMES == {"cuLaunchHostFunc", "cuLaunchHostFunc_ptsz"}
    assert LAUNCH_NAMES <= launchy

    r = run_app("report")
    assert_app_completed(r)
    assert r.values["subscriber"] == "1"
    enabled = [int(i) for i in r.values["enabled"].split(",")]
    assert {table[i] for i in enabled} == LAUNCH_NAMES
    assert int(r.values["enabled_count"]) == len(LAUNCH_NAMES) == 12
    assert r.stats()["launch_callbacks"] == 12


def test_no_launches_no_counts(run_app):
    r = run_app()
    assert_app_completed(r)
    stats = r.stats()
    assert stats["active"] is True
    assert stats["kernel_launches"] == stats["graph_launches"] == stats["callbacks"] == 0
    assert stats["by_entry_point"] == {}


def test_many_threads_launching_at_once(run_app):
    threads, per_thread = 16, 20_000
    r = run_app(f"threads:{threads}:{per_thread}")
    assert_app_completed(r)
    expected = thread_mix_counts(threads, per_thread)
    assert sum(expected.values()) == threads * per_thread
    assert r.called == expected
    assert_counts(r.stats(), expected)


def test_many_threads_with_trace(run_app):
    threads, per_thread = 8, 1_500
    # Small buffers: hundreds of buffers are completed, from all launching threads.
    r = run_app(f"threads:{threads}:{per_thread}", trace=True,
                env={"FAKE_CUPTI_RECORDS_PER_BUFFER": "5"})
    assert_app_completed(r)
    expected = thread_mix_counts(threads, per_thread)
    stats = r.stats()
    assert_counts(stats, expected)
    records = r.trace()
    kernels = [x for x in records if x["type"] == "kernel"]
    graphs = [x for x in records if x["type"] == "graph_launch"]
    assert len(kernels) == sum(RECORDS[api] * n for api, n in expected.items())
    assert len(graphs) == expected["cuGraphLaunch"] + expected["cuGraphLaunch_ptsz"]
    assert stats["trace_kernels"] == len(kernels)
    assert stats["trace_dropped"] == 0
    # One graph_launch line per graph launch, each with its own correlation id.
    assert len({g["correlation"] for g in graphs}) == len(graphs)


# ----------------------------------------------------------------- trace

def test_trace_format(run_app):
    steps = [f"launch:{entry}:2" for entry, _, _, _ in ENTRIES]
    # Interleave records of another kind: the agent must skip them while walking buffers.
    r = run_app(*steps, trace=True, env={"FAKE_CUPTI_FOREIGN_RECORDS": "1",
                                         "FAKE_CUPTI_RECORDS_PER_BUFFER": "3"})
    assert_app_completed(r)
    assert r.stderr == ""
    records = r.trace()
    kernels = [x for x in records if x["type"] == "kernel"]
    graphs = [x for x in records if x["type"] == "graph_launch"]
    assert len(kernels) + len(graphs) == len(records)
    assert len(kernels) == sum(2 * n for n in RECORDS.values()) == 30
    assert len(graphs) == 4
    for k in kernels:
        assert set(k) == TRACE_KEYS
        assert isinstance(k["name"], str) and k["name"]
        for key in ("grid", "block"):
            assert len(k[key]) == 3 and all(isinstance(v, int) and v >= 1 for v in k[key])
        for key in TRACE_KEYS - {"type", "name", "grid", "block"}:
            assert isinstance(k[key], int) and k[key] >= 0, key
        assert k["context"] == 1
        assert 0 < k["start_ns"] <= k["end_ns"]
    for g in graphs:
        assert set(g) == {"type", "correlation", "graph_exec", "stream"}
    # The graph's kernel nodes carry the correlation id of their cuGraphLaunch.
    node_correlations = Counter(k["correlation"] for k in kernels if k["name"].startswith("graph_node_"))
    assert node_correlations == Counter({g["correlation"]: 2 for g in graphs})
    # Kernels of one cooperative multi-device launch: one per device, same correlation.
    multi = [k for k in kernels if k["name"] == "mix_kernel_coop_multi"]
    assert sorted(k["device"] for k in multi) == [0, 0, 1, 1]
    assert len({k["correlation"] for k in multi}) == 2
    # Values come from the launch: fake_app's launch 1 of cuLaunchKernel is grid (2,2,1),
    # block (64,1,1), 16 bytes of dynamic shared memory, on the stream it created.
    (k,) = [k for k in kernels if k["name"] == "mix_kernel_kernel" and k["grid"] == [2, 2, 1]]
    assert k["block"] == [64, 1, 1] and k["dynamic_smem"] == 16 and k["stream"] == 20
    legacy = [k for k in kernels if k["name"] == "mix_kernel_legacy"]
    assert all(k["block"] == [64, 2, 1] and k["grid"] == [1, 1, 1] for k in legacy)
    stats = r.stats()
    assert stats["trace_kernels"] == 30 and stats["trace_dropped"] == 0


def test_trace_escapes_awkward_kernel_names(run_app):
    r = run_app("names", trace=True)
    assert_app_completed(r)
    expected = [bytes.fromhex(line.split("=", 1)[1]).decode("utf-8")
                for line in r.stdout.splitlines() if line.startswith("fake_app: name_hex=")]
    assert len(expected) == 8 and any('"' in n for n in expected) and any("\\" in n for n in expected)
    lines = r.trace_lines()
    assert len(lines) == len(expected)  # a raw newline in a name would split a line
    assert all(0x20 <= ord(c) for line in lines for c in line)  # control characters escaped
    names = [json.loads(line)["name"] for line in lines]
    assert names == expected
    for k in map(json.loads, lines):
        assert k["grid"] == [3, 2, 1] and k["block"] == [64, 2, 1] and k["dynamic_smem"] == 128


def test_trace_flushed_at_exit(run_app):
    # Fewer records than one buffer holds: only the flush at exit delivers them.
    r = run_app("launch:kernel:5", "exit:4", trace=True, env={"FAKE_CUPTI_RECORDS_PER_BUFFER": "1000"})
    assert r.returncode == 4
    correlations = [k["correlation"] for k in r.trace()]
    assert len(correlations) == 5 and correlations == sorted(correlations)
    assert r.stats()["trace_kernels"] == 5


# ------------------------------------------------------------- fail-open

def test_no_libcupti_anywhere(run_app):
    # No TALLY_CUPTI_PATH/SEARCH; fake_app hides any toolkit libcupti on this machine.
    r = run_app("launch:kernel:4", "launch:graph:2", "exit:7", cupti=None)
    assert_app_completed(r, 7)
    assert r.called == {"cuLaunchKernel": 4, "cuGraphLaunch": 2}
    assert_one_warning(r, "libcupti not found", "runs without tally")
    stats = r.stats()
    assert stats["active"] is False and "libcupti not found" in stats["failopen_reason"]
    assert stats["kernel_launches"] == 0 and stats["launch_callbacks"] == 0


def test_cupti_path_to_missing_file(run_app, tmp_path):
    missing = tmp_path / "nowhere" / "libcupti.so"
    r = run_app("launch:kernel:3", "exit:7", cupti=missing)
    assert_app_completed(r, 7)
    assert_one_warning(r, f"TALLY_CUPTI_PATH={missing}")
    stats = r.stats()
    assert stats["active"] is False and str(missing) in stats["failopen_reason"]


def test_cupti_search_list_takes_first_loadable(run_app, doubles, tmp_path):
    search = f"{tmp_path}/a/libcupti.so:{doubles.cupti}:{doubles.cupti_no_enable}"
    r = run_app("launch:kernel:3", cupti=None, env={"TALLY_CUPTI_SEARCH": search})
    assert_app_completed(r)
    assert r.stderr == ""
    stats = r.stats()
    assert stats["active"] is True and stats["cupti"] == str(doubles.cupti)
    assert stats["kernel_launches"] == 3


def test_cupti_search_list_with_nothing_loadable(run_app, tmp_path):
    r = run_app("launch:kernel:3", cupti=None,
                env={"TALLY_CUPTI_SEARCH": f"{tmp_path}/a/libcupti.so:{tmp_path}/b/libcupti.so.13"})
    assert_app_completed(r)
    assert_one_warning(r, "libcupti not found")


def test_libcupti_lacking_a_required_symbol(run_app, doubles):
    r = run_app("launch:kernel:3", "exit:7", cupti=doubles.cupti_no_enable)
    assert_app_completed(r, 7)
    assert_one_warning(r, "lacks cuptiEnableCallback")
    assert r.stats()["active"] is False


@pytest.mark.parametrize("result, reason", [
    (39, "another CUPTI subscriber"),
    (12, "another CUPTI subscriber"),
    (35, "cuptiSubscribe failed (CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)"),
])
def test_cupti_subscriber_unavailable(run_app, result, reason):
    r = run_app("launch:kernel:3", "launch:graph:1", "report", "exit:7",
                env={"FAKE_CUPTI_SUBSCRIBE_RESULT": str(result)})
    assert_app_completed(r, 7)
    assert r.called == {"cuLaunchKernel": 3, "cuGraphLaunch": 1}
    assert r.values["subscriber"] == "0"
    assert_one_warning(r, reason)
    stats = r.stats()
    assert stats["active"] is False and reason in stats["failopen_reason"]
    assert stats["kernel_launches"] == 0


@pytest.mark.parametrize("where", ["missing_dir", "file_as_dir"])
def test_unwritable_trace_dir(run_app, tmp_path, where):
    if where == "missing_dir":
        trace_dir = tmp_path / "no" / "such" / "dir"
    else:
        (tmp_path / "a_file").write_text("")
        trace_dir = tmp_path / "a_file" / "sub"
    r = run_app("launch:kernel:5", "launch:graph:2", env={"TALLY_TRACE_DIR": str(trace_dir)})
    assert_app_completed(r)
    warning = assert_one_warning(r, f"{trace_dir}/trace-{r.pid}.jsonl")
    # Only the trace is lost: tally itself still runs, and must not say otherwise.
    assert "without tally" not in warning
    stats = r.stats()
    assert stats["active"] is True
    assert_counts(stats, {"cuLaunchKernel": 5, "cuGraphLaunch": 2})


def test_trace_without_activity_api(run_app, doubles):
    r = run_app("launch:kernel:5", cupti=doubles.cupti_no_activity, trace=True)
    assert_app_completed(r)
    warning = assert_one_warning(r, "Activity API")
    assert "without tally" not in warning
    assert list(r.trace_dir.iterdir()) == []
    stats = r.stats()
    assert stats["active"] is True
    assert_counts(stats, {"cuLaunchKernel": 5})


def test_unwritable_stats_dir_is_silent(run_app, tmp_path):
    r = run_app("launch:kernel:2", "exit:3", env={"TALLY_STATS_DIR": str(tmp_path / "none" / "here")})
    assert_app_completed(r, 3)
    assert r.stderr == ""


# ------------------------------------------------------ chained injection

def test_chained_profiler_holding_cupti(run_app, doubles):
    r = run_app("launch:kernel:6", "launch:ex:2", "exit:7",
                env={"TALLY_CHAINED_INJECTION": str(doubles.profiler)})
    assert_app_completed(r, 7)
    assert "fake_profiler: initialized calls=1" in r.stdout
    assert "fake_profiler: subscribe=0" in r.stdout
    assert "fake_profiler: launches=6" in r.stdout  # the profiler keeps working
    assert_one_warning(r, "another CUPTI subscriber")
    stats = r.stats()
    assert stats["active"] is False and stats["kernel_launches"] == 0


def test_chained_injection_without_cupti(run_app, doubles):
    r = run_app("launch:kernel:6", env={"TALLY_CHAINED_INJECTION": str(doubles.profiler),
                                        "FAKE_PROFILER_SUBSCRIBE": "0"})
    assert_app_completed(r)
    assert "fake_profiler: initialized calls=1" in r.stdout
    assert r.stderr == ""
    stats = r.stats()
    assert stats["active"] is True
    assert_counts(stats, {"cuLaunchKernel": 6})


def test_chained_injection_missing(run_app, tmp_path):
    r = run_app("launch:kernel:2", env={"TALLY_CHAINED_INJECTION": str(tmp_path / "gone.so")})
    assert_app_completed(r)
    assert_one_warning(r, "chained injection", "gone.so")
    assert_counts(r.stats(), {"cuLaunchKernel": 2})


def test_chained_injection_naming_the_agent_itself(run_app, doubles, tmp_path):
    # E.g. `tally run` inside `tally run` reaching the agent by another path.
    link = tmp_path / "agent-link.so"
    link.symlink_to(doubles.agent)
    r = run_app("launch:kernel:4", env={"TALLY_CHAINED_INJECTION": str(link)}, timeout=20)
    assert_app_completed(r)
    assert r.stderr == ""
    stats = r.stats()
    assert stats["active"] is True
    assert_counts(stats, {"cuLaunchKernel": 4})


# -------------------------------------------------------- fork and exit

def test_fork_children_account_for_themselves(run_app):
    r = run_app("launch:kernel:5", "launch:graph:1", "fork:0:0", "fork:3:5", "launch:kernel:2")
    assert_app_completed(r)
    children = re.findall(r"fake_app: child_pid=(\d+)", r.stdout)
    exits = re.findall(r"fake_app: child_exit=(-?\d+)", r.stdout)
    assert exits == ["0", "5"]
    quiet, busy = map(int, children)
    assert sorted(p.name for p in r.stats_dir.iterdir()) == sorted(
        [f"stats-{r.pid}.json", f"stats-{busy}.json"])  # the child that launched nothing wrote none
    assert_counts(r.stats(), {"cuLaunchKernel": 7, "cuGraphLaunch": 1})
    child = r.stats(busy)
    assert child["pid"] == busy and child["active"] is True
    assert_counts(child, {"cuLaunchKernel": 3})


def test_fork_does_not_duplicate_or_inherit_trace(run_app):
    # Enough records that buffers complete before the fork, and graph_launch
    # lines still sitting in the parent's stdio buffer when it forks.
    r = run_app("launch:kernel:40", "launch:graph:3", "fork:0:0", "fork:2:0", "launch:graph:1",
                trace=True, env={"FAKE_CUPTI_RECORDS_PER_BUFFER": "8"})
    assert_app_completed(r)
    records = r.trace()
    graphs = [x for x in records if x["type"] == "graph_launch"]
    kernels = [x for x in records if x["type"] == "kernel"]
    assert len(graphs) == 4
    assert len(kernels) == 40 + 2 * 4
    assert len({(k["correlation"], k["name"]) for k in kernels}) == len(kernels)
    assert r.stats()["trace_kernels"] == 48
    busy = int(re.findall(r"fake_app: child_pid=(\d+)", r.stdout)[1])
    child = r.stats(busy)
    assert child["kernel_launches"] == 2
    assert child["trace_kernels"] == 0  # the child traced nothing itself
    assert [p.name for p in r.trace_dir.iterdir()] == [f"trace-{r.pid}.jsonl"]


@pytest.mark.parametrize("code", [0, 7, 255])
def test_exit_code_propagates(run_app, code):
    r = run_app("launch:kernel:3", f"exit:{code}")
    assert r.returncode == code
    assert r.stderr == ""
    assert_counts(r.stats(), {"cuLaunchKernel": 3})  # atexit still wrote the stats


def test_without_injection_nothing_is_written(run_app):
    r = run_app("launch:kernel:3", "exit:7", inject=False)
    assert r.returncode == 7
    assert list(r.stats_dir.iterdir()) == []


def test_verbose_announces_activation(run_app, doubles):
    r = run_app("launch:kernel:1", env={"TALLY_VERBOSE": "1"})
    assert_app_completed(r)
    assert r.stderr_lines == [
        f"tally: agent active in pid {r.pid} ({doubles.cupti}, 12 launch entry points)"]


# ------------------------------------------------ layouts vs the toolkit

TOOLKIT_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0")) / "include"

LAYOUT_FIELDS = {
    "KERNEL": ["kind", "registersPerThread", "start", "end", "completed", "deviceId", "contextId",
               "streamId", "gridX", "gridY", "gridZ", "blockX", "blockY", "blockZ",
               "staticSharedMemory", "dynamicSharedMemory", "correlationId", "gridId", "name"],
    "KERNEL_FULL": ["reserved0", "queued", "submitted", "launchType", "sharedMemoryExecuted",
                    "graphNodeId", "shmemLimitConfig", "graphId", "pAccessPolicyWindow",
                    "channelID", "channelType", "clusterX", "clusterSchedulingPolicy",
                    "localMemoryTotal_v2", "maxActiveClusters", "isDeviceLaunched"],
    "CBDATA": ["callbackSite", "functionName", "functionParams", "functionReturnValue", "symbolName",
               "context", "contextUid", "correlationData", "correlationId"],
    "LK": ["f", "gridDimX", "blockDimZ", "sharedMemBytes", "hStream", "kernelParams", "extra"],
    "LKEX": ["config", "f", "kernelParams", "extra"],
    "CFG": ["gridDimX", "blockDimZ", "sharedMemBytes", "hStream", "attrs", "numAttrs"],
}


def _layout_program(types: dict[str, str], includes: str, groups: list[str]) -> str:
    lines = [includes, "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
    for group in groups:
        t = types[group]
        lines.append(f'printf("{group} sizeof %zu\\n", sizeof({t}));')
        for f in LAYOUT_FIELDS[group]:
            lines.append(f'printf("{group} {f} %zu\\n", offsetof({t}, {f}));')
    lines.append("return 0; }")
    return "\n".join(lines)


def _layout(gcc: str, source: str, tmp_path: Path, name: str, include_dirs: list[Path]) -> dict[str, int]:
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    exe = tmp_path / name
    args = [gcc, "-std=c11", *[f"-I{d}" for d in include_dirs], "-o", str(exe), str(c)]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()}


def test_declared_layouts_match_the_cuda_toolkit(tmp_path):
    """The agent's and the doubles' own declarations against cupti_activity.h & co."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    if not (TOOLKIT_INCLUDE / "cupti_activity.h").is_file():
        pytest.skip(f"no CUDA toolkit headers at {TOOLKIT_INCLUDE} to compare against")
    repo = Path(__file__).resolve().parents[2]
    groups = list(LAYOUT_FIELDS)
    real = _layout(gcc, _layout_program(
        {"KERNEL": "CUpti_ActivityKernel10", "KERNEL_FULL": "CUpti_ActivityKernel10",
         "CBDATA": "CUpti_CallbackData", "LK": "cuLaunchKernel_params", "LKEX": "cuLaunchKernelEx_params",
         "CFG": "CUlaunchConfig"},
        "#include <cupti.h>  /* includes generated_cuda_meta.h */", groups), tmp_path, "real", [TOOLKIT_INCLUDE])
    doubles = _layout(gcc, _layout_program(
        {"KERNEL": "fake_ActivityKernel10", "KERNEL_FULL": "fake_ActivityKernel10",
         "CBDATA": "CUpti_CallbackData", "LK": "cuLaunchKernel_params", "LKEX": "cuLaunchKernelEx_params",
         "CFG": "CUlaunchConfig"},
        '#include "fake_cupti_types.h"', groups), tmp_path, "doubles", [DOUBLES])
    assert doubles == real
    agent_groups = ["KERNEL", "CBDATA", "LK", "LKEX", "CFG"]
    agent = _layout(gcc, _layout_program(
        {"KERNEL": "tally_ActivityKernelPrefix", "CBDATA": "CUpti_CallbackData",
         "LK": "tally_cuLaunchKernel_params", "LKEX": "tally_cuLaunchKernelEx_params",
         "CFG": "tally_CUlaunchConfig"},
        '#include "cuda_decls.h"', agent_groups), tmp_path, "agent", [repo / "agent"])
    for key, offset in agent.items():
        if key == "KERNEL sizeof":
            assert offset <= real[key]  # the agent declares a prefix only
        else:
            assert offset == real[key], key
