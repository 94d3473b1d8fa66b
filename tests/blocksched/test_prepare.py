"""`prepare`: saved code images -> transformed kernels through the kernel cache."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tally.blocksched import _files
from tally.blocksched.cache import KernelCache
from tally.blocksched.cli import blocksched_group
from tally.blocksched.prepare import fnv1a64, image_name, prepare
from tally.errors import TallyError

CORPUS = Path(__file__).resolve().parents[1] / "ptx" / "corpus" / "cuda"
PTX = (CORPUS / "elementwise.ptx").read_bytes()
REFUSED = (CORPUS / "refused.ptx").read_bytes()
ELF = b"\x7fELF\x02\x01\x01\x41" + bytes(range(256))
MODES = ["slice", "ptb", "preemptible"]


@pytest.fixture(autouse=True)
def fresh_warnings():
    _files.reset_warnings()
    yield
    _files.reset_warnings()


def save(directory: Path, data: bytes, name: str | None = None) -> str:
    name = name or image_name(data)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    return name


def corrupt_fatbin() -> bytes:
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 4096) + b"\x01" * 100  # claims 4096 bytes, has 100


@pytest.fixture
def modules(tmp_path):
    d = tmp_path / "modules"
    names = {"ptx": save(d, PTX + b"\0"), "refused": save(d, REFUSED), "elf": save(d, ELF),
             "corrupt": save(d, corrupt_fatbin()), "renamed": save(d, PTX, "0123456789abcdef.img")}
    save(d, b"not an image", "notes.txt")  # ignored: not *.img
    (d / "fedcba9876543210.img").mkdir()
    return d, names


def test_fnv1a64_is_the_agents_hash():
    from tally.profiles import fnv1a64 as profiles_fnv

    assert fnv1a64(b"") == 0xCBF29CE484222325 and fnv1a64(b"foobar") == 0x85944171F73967E8
    assert fnv1a64(PTX) == profiles_fnv(PTX)
    assert image_name(b"a") == "af63dc4c8601ec8c.img"


def test_prepare(modules, tmp_path, capsys):
    d, names = modules
    cache = KernelCache(tmp_path / "kernels")
    report = prepare(d, cache, triton_dirs=[tmp_path / "no-triton"])
    images = {i.name: i for i in report.images}
    assert [i.name for i in report.images] == sorted(images)

    ptx = images[names["ptx"]]
    assert ptx.status == "ok" and ptx.kind == "ptx" and ptx.bytes == len(PTX) + 1
    assert [s.origin for s in ptx.sources] == ["ptx image"]
    assert ptx.sources[0].entries == ["saxpy", "grid_ids_3d", "add_2d", "exit_early"]
    assert {(k.entry, k.mode, k.status, k.cache_hit) for k in ptx.kernels} == {
        (e, m, "ok", False) for e in ptx.sources[0].entries for m in MODES}

    refused = {(k.entry, k.mode): k for k in images[names["refused"]].kernels}
    grid_sync = refused[("grid_sync", "ptb")]
    assert grid_sync.status == "refused" and "grid-wide sync" in grid_sync.reason
    assert refused[("named_barrier", "slice")].status == "ok"

    elf = images[names["elf"]]
    assert elf.status == "no-ptx" and elf.kind == "elf" and elf.reason.startswith("cubin only")
    corrupt = images[names["corrupt"]]
    assert corrupt.status == "error" and "malformed fatbin" in corrupt.reason and "truncated" in corrupt.reason
    renamed = images["0123456789abcdef.img"]
    assert renamed.status == "skipped" and "not the FNV-1a-64" in renamed.reason and not renamed.kernels
    assert renamed.kind is None  # its bytes are not looked at
    assert images["fedcba9876543210.img"].status == "skipped"
    assert "notes.txt" not in images
    err = capsys.readouterr().err
    assert "tally: warning: " in err and "0123456789abcdef.img: name is not the FNV-1a-64" in err

    s = report.summary()
    assert s["images"] == 6 and s["images_with_ptx"] == 2 and s["images_skipped"] == 2 and s["images_failed"] == 1
    assert s["transforms"] == 3 * (4 + 6) and s["cache_hits"] == 0 and s["ok"] + s["refused"] == s["transforms"]


def test_second_run_is_all_cache_hits(modules, tmp_path, monkeypatch):
    d, _ = modules
    first = prepare(d, KernelCache(tmp_path / "kernels"), triton_dirs=[])
    assert first.kernels and not any(k.cache_hit for k in first.kernels)
    import tally.ptx.transform

    monkeypatch.setattr(tally.ptx.transform, "transform_module",
                        lambda *a: pytest.fail("a second run must not run tally.ptx"))
    second = prepare(d, KernelCache(tmp_path / "kernels"), triton_dirs=[])
    assert second.all_cache_hits and len(second.kernels) == len(first.kernels)
    assert [(k.entry, k.mode, k.status, k.reason) for k in second.kernels] == \
           [(k.entry, k.mode, k.status, k.reason) for k in first.kernels]
    assert second.summary()["cache_hits"] == len(second.kernels)


def test_report_is_json_and_one_line_per_kernel(modules, tmp_path):
    d, names = modules
    report = prepare(d, KernelCache(tmp_path / "kernels"), triton_dirs=[])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["format"] == "tally-prepare-report" and data["summary"] == report.summary()
    assert len(data["images"]) == 6
    lines = report.lines()
    stem = names["ptx"][:-4]
    assert f"{stem} ptx image: saxpy: ok slice,ptb,preemptible (cached 0/3)" in lines
    refused_stem = names["refused"][:-4]
    grid_sync = [line for line in lines if line.startswith(f"{refused_stem} ptx image: grid_sync: ")]
    assert len(grid_sync) == 1 and "refused slice,ptb,preemptible: grid-wide sync" in grid_sync[0]
    assert any(line.startswith("0123456789abcdef: skipped: name is not") for line in lines)
    assert any(line.startswith(names["corrupt"][:-4] + ": error: malformed fatbin") for line in lines)
    assert lines[-1].startswith("6 image(s): 2 with PTX")
    kernels = [line for line in lines if " ptx image: " in line]
    assert len(kernels) == 4 + 6  # one per entry


def test_ptx_text_that_does_not_parse_is_reported(tmp_path):
    d = tmp_path / "modules"
    name = save(d, b".version 8.4\n.target sm_90\n.entry broken( {\n")
    report = prepare(d, KernelCache(tmp_path / "kernels"), triton_dirs=[])
    (image,) = report.images
    assert image.status == "ok" and not image.kernels and "not PTX" in image.sources[0].reason
    assert any(line.startswith(name[:-4] + " ptx image: not PTX") for line in report.lines())


def test_triton_images_get_their_ptx(tmp_path):
    d = tmp_path / "modules"
    save(d, ELF)
    entry = tmp_path / "triton" / "abc"
    entry.mkdir(parents=True)
    (entry / "saxpy.cubin").write_bytes(ELF)
    (entry / "saxpy.ptx").write_bytes(PTX)
    report = prepare(d, KernelCache(tmp_path / "kernels"), modes=["slice"], triton_dirs=[tmp_path / "triton"])
    (image,) = report.images
    assert image.status == "ok" and image.sources[0].origin == f"triton cache {entry / 'saxpy.ptx'}"
    assert [(k.entry, k.status) for k in image.kernels][0] == ("saxpy", "ok")


def test_unreadable_image_is_reported(tmp_path, monkeypatch):
    d = tmp_path / "modules"
    name = save(d, PTX)
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith(name):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    (image,) = prepare(d, KernelCache(tmp_path / "kernels"), triton_dirs=[]).images
    assert image.status == "error" and image.reason == "unreadable: Permission denied"


def test_bad_arguments(tmp_path):
    with pytest.raises(TallyError, match="does not exist"):
        prepare(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TallyError, match="is not a directory"):
        prepare(tmp_path / "file")
    with pytest.raises(TallyError, match="unknown transformation mode 'fast'"):
        prepare(tmp_path, modes=["fast"])


# ---------------------------------------------------------------- CLI


def test_cli_prepare(modules, tmp_path):
    d, names = modules
    env = {"TALLY_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "no-triton"),
           "TRITON_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "no-inductor")}
    r = CliRunner().invoke(blocksched_group, ["prepare", "--modules", str(d)], env=env)
    assert r.exit_code == 0, r.output
    assert f"{names['ptx'][:-4]} ptx image: saxpy: ok slice,ptb,preemptible (cached 0/3)" in r.output
    r = CliRunner().invoke(blocksched_group, ["prepare", "--modules", str(d), "--json"], env=env)
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["summary"]["cache_hits"] == data["summary"]["transforms"] > 0
    # the default directory is <cache_dir>/modules
    default = tmp_path / "cache" / "modules"
    save(default, PTX)
    r = CliRunner().invoke(blocksched_group, ["prepare"], env=env)
    assert r.exit_code == 0 and "ptx image: saxpy: ok" in r.output


def test_cli_missing_directory_is_one_line_exit_2(tmp_path):
    env = dict(os.environ, TALLY_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "tally", "blocksched", "prepare"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [f"tally: error: module directory {tmp_path / 'modules'} does not exist "
                                       "(the agent saves best-effort programs' code images there)"]


def test_compile_assembles_every_module_once_per_mode(modules, tmp_path, monkeypatch):
    """--compile: each module with an ok transformation in a mode is assembled once for that mode and
    its cubin cached; a second run assembles nothing."""
    d, _ = modules
    calls = tmp_path / "ptxas-calls"
    fake = tmp_path / "ptxas"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Cuda compilation tools, V13.0.88"; exit 0; fi\n'
                    f'echo x >> {calls}\n'
                    'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done; printf "\\177ELF" > "$out"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("TALLY_PTXAS", str(fake))
    cache = KernelCache(tmp_path / "kernels")
    first = prepare(d, cache, compile_arch="sm_90")
    ok = [k for k in first.kernels if k.status == "ok"]
    assert ok and first.compiled_for == "sm_90" and "compiled for sm_90" in first.text()
    assembled = {(i.name, k.mode) for i in first.images for k in i.kernels if k.status == "ok"}
    assert len(calls.read_text().split()) == len(assembled) < len(ok)
    second = prepare(d, KernelCache(cache.root), compile_arch="sm_90")
    assert [k.status for k in second.kernels] == [k.status for k in first.kernels]
    assert all(k.cache_hit for k in second.kernels) and len(calls.read_text().split()) == len(assembled)


def test_compile_needs_a_ptxas_and_a_real_architecture(modules, tmp_path, monkeypatch):
    d, _ = modules
    with pytest.raises(TallyError, match="expected a GPU architecture"):
        prepare(d, KernelCache(tmp_path / "k"), compile_arch="hopper")
    monkeypatch.setenv("TALLY_PTXAS", str(tmp_path / "missing"))
    with pytest.raises(TallyError, match="not an executable"):
        prepare(d, KernelCache(tmp_path / "k"), compile_arch="sm_90")
