"""GPU discovery and MPS plumbing; the real-MPS test runs only on a GPU node."""
import os
import stat

import pytest

from tally import gpus as gpumod
from tally import mps as mpsmod
from tally.errors import TallyError

G = [gpumod.GpuInfo(0, "GPU-11aa-x", "H100", "580", "13.0"), gpumod.GpuInfo(1, "GPU-22bb-y", "H100", "580", "13.0"),
     gpumod.GpuInfo(2, "GPU-22cc-z", "H100", "580", "13.0")]


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2]),
    ("", []),
    ("2,0", [2, 0]),
    ("1,9,0", [1]),              # CUDA stops at the first entry that names no GPU
    ("GPU-22cc", [2]),
    ("11aa", [0]),               # UUID prefix without "GPU-"
    ("GPU-22", []),              # ambiguous prefix names no GPU
    ("0,0", []),                 # a duplicate makes CUDA see nothing
    ("-1", []),
])
def test_cuda_visible_devices(visible, expected):
    assert [g.index for g in gpumod.filter_visible(G, visible)] == expected


def test_select_for_gpus_option():
    assert [g.index for g in gpumod.select(G, "2,GPU-11aa,2")] == [2, 0]
    assert gpumod.select(G, None) == G and gpumod.select(G, "all") == G
    with pytest.raises(ValueError, match="no GPU '5'"):
        gpumod.select(G, "5")


def test_parse_nvidia_smi_csv():
    text = ("0, GPU-5c3c0000-1111-2222-3333-444455556666, NVIDIA H100 80GB HBM3, 580.159.04\n"
            "1, GPU-aaaa0000-1111-2222-3333-444455556666, NVIDIA A100, 40GB, 580.159.04\n"
            "garbage line\n")
    found = gpumod.parse_nvidia_smi_csv(text, "13.0")
    assert [(g.index, g.uuid[:8], g.name, g.driver_version, g.cuda_driver_version) for g in found] == [
        (0, "GPU-5c3c", "NVIDIA H100 80GB HBM3", "580.159.04", "13.0"),
        (1, "GPU-aaaa", "NVIDIA A100, 40GB", "580.159.04", "13.0")]


def test_fake_gpus_and_visible_devices(monkeypatch):
    monkeypatch.setenv("TALLY_FAKE_GPUS", "GPU-aaaa, GPU-bbbb")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.uuid for g in gpumod.list_gpus()] == ["GPU-bbbb"]
    monkeypatch.setenv("TALLY_FAKE_GPUS", "")
    assert gpumod.list_gpus() == []


def test_no_driver_gives_empty_list(monkeypatch, tmp_path):
    monkeypatch.delenv("TALLY_FAKE_GPUS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(gpumod, "_nvml_gpus", lambda: None)  # as if nvidia-ml-py were not installed
    assert gpumod.list_gpus() == []


def _fake_binaries(directory):
    for name in (mpsmod.CONTROL, mpsmod.SERVER):
        path = directory / name
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_find_binaries(monkeypatch, tmp_path):
    monkeypatch.setenv("TALLY_MPS_BIN_DIR", str(tmp_path))
    with pytest.raises(TallyError, match=r"MPS binaries not found \(nvidia-cuda-mps-control, nvidia-cuda-mps-server"):
        mpsmod.find_binaries()
    _fake_binaries(tmp_path)
    found = mpsmod.find_binaries()
    assert found.control == str(tmp_path / mpsmod.CONTROL) and found.server == str(tmp_path / mpsmod.SERVER)


def test_client_env(tmp_path):
    m = mpsmod.PrivateMps(tmp_path)
    assert m.client_env() == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps" / "pipe"),
                              "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps" / "log")}
    env = m.client_env(active_thread_percentage=50, pinned_device_mem_limit="0=8G")
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50" and env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8G"
    with pytest.raises(TallyError, match="not in 1..100"):
        m.client_env(active_thread_percentage=0)


def test_external_mps_must_exist(tmp_path):
    with pytest.raises(TallyError, match="does not exist"):
        mpsmod.ExternalMps(tmp_path / "nope", None).check()
    with pytest.raises(TallyError, match="no MPS control daemon listens"):
        mpsmod.ExternalMps(tmp_path, None).check()
    os.mkfifo(tmp_path / "control")
    assert mpsmod.ExternalMps(tmp_path, None).check().env() == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}


def _real_gpu_and_mps():
    if os.environ.get("TALLY_FAKE_GPUS") is not None or not gpumod.list_gpus():
        return False
    try:
        mpsmod.find_binaries()
    except TallyError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu_and_mps(), reason="needs an NVIDIA GPU and the MPS binaries")
def test_private_mps_starts_and_stops(tmp_path):
    with mpsmod.PrivateMps(tmp_path) as m:
        assert m.is_running()
        pid = m.control_pid()
        assert pid and mpsmod._process_alive(pid)
        with pytest.raises(TallyError, match="already runs"):
            mpsmod.PrivateMps(tmp_path).start()
    assert not mpsmod._process_alive(pid), f"control daemon {pid} still runs as {mpsmod._program_names(pid)}"
    assert not m.is_running()
