"""Per-client device memory in `tally status`, through NVML when pynvml is
importable; "-" and no failure otherwise."""
import os
import sys
import types

from tally import scoreboard as sb
from tally.daemon import cli as dcli

UP = ("up", "--no-mps", "--metrics-port", "0")


def _fake_pynvml(processes, fail=None):
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(processes)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetUUID = lambda h: list(processes)[h].encode()

    def running(handle):
        if fail:
            raise fail
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in processes[list(processes)[handle]].items()]

    mod.nvmlDeviceGetComputeRunningProcesses = running
    return mod


def test_memory_per_client_from_nvml(tally_env, monkeypatch):
    assert tally_env.tally(*UP).returncode == 0
    state = tally_env.state()
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(
        {"GPU-aaaa1111": {os.getpid(): 3 << 30, 999999: 1 << 20}, "GPU-bbbb2222": {os.getpid(): None}}))
    with sb.Scoreboard.open(state["gpus"][0]["scoreboard"]) as a, \
            sb.Scoreboard.open(state["gpus"][1]["scoreboard"]) as b:
        sa = a.claim_slot(os.getpid(), sb.PRIORITY_HIGH, comm="pytest")
        sb_ = b.claim_slot(os.getpid(), sb.PRIORITY_BEST_EFFORT, comm="pytest")
        report = dcli.collect_status(state)
        assert report["gpus"][0]["clients"][0]["memory_bytes"] == 3 << 30
        assert report["gpus"][1]["clients"][0]["memory_bytes"] is None  # NVML had no figure (e.g. under MPS)
        assert dcli._memory_text(3 << 30) == "3.0 GiB" and dcli._memory_text(None) == "-"
        # NVML failing mid-way: no figures, no failure
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml({"GPU-aaaa1111": {}}, fail=RuntimeError("x")))
        assert dcli.collect_status(state)["gpus"][0]["clients"][0]["memory_bytes"] is None
        a.release_slot(sa)
        b.release_slot(sb_)
    assert tally_env.tally("down").returncode == 0


def test_status_without_pynvml_shows_dash(tally_env):
    assert tally_env.tally(*UP).returncode == 0
    with sb.Scoreboard.open(tally_env.state()["gpus"][0]["scoreboard"]) as board:
        slot = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, comm="pytest")
        table = tally_env.tally("status", env={"COLUMNS": "250"})
        assert table.returncode == 0 and "memory" in table.stdout
        board.release_slot(slot)
    assert tally_env.tally("down").returncode == 0
