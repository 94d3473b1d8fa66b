"""The block-level plan: `prepare --compile` writes it with its cubins, `read_plan` reads it strictly,
`tally run --block-level` hands it to the agent; and prepare's work per module, not per kernel."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tally.blocksched import _files
from tally.blocksched import plan as planmod
from tally.blocksched.cache import KernelCache
from tally.blocksched.cli import blocksched_group
from tally.blocksched.plan import HEADER, PlanEntry, plan_text, read_plan
from tally.blocksched.prepare import image_name, module_globals, prepare, referenced_globals
from tally.errors import TallyError
from tally.files import fnv1a64
from tally.ptx.parse import parse
from tally.ptx.ptxas import assembly_arch

ROOT = Path(__file__).resolve().parents[1] / "ptx" / "corpus"
PTX = (ROOT / "cuda" / "elementwise.ptx").read_text()  # 4 entries, all transformable, no globals
REFUSED = (ROOT / "cuda" / "refused.ptx").read_text()
TRITON = (ROOT / "triton" / "sum_rows.ptx").read_text()  # .target sm_90a, no globals
TRITON_GLOBALS = (ROOT / "triton" / "elementwise_gelu.ptx").read_text()  # .global _$_str
TALLY = [sys.executable, "-m", "tally"]


@pytest.fixture(autouse=True)
def fresh_warnings():
    _files.reset_warnings()
    yield
    _files.reset_warnings()


def save(directory: Path, data: bytes) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    name = image_name(data)
    (directory / name).write_bytes(data)
    return name[:-4]


def with_target(text: str, target: str) -> str:
    return re.sub(r"^\.target\s+\S+", f".target {target}", text, count=1, flags=re.M)


def with_global(text: str, used: bool = True) -> str:
    """PTX with a module-scope variable `counter`, which saxpy reads (unless used=False)."""
    text = text.replace(".address_size 64", ".address_size 64\n\n.global .align 4 .u32 counter = 7;", 1)
    if used:
        text = text.replace("ld.param.u32 \t%r2, [saxpy_param_3];",
                            "ld.param.u32 \t%r2, [saxpy_param_3];\n\tld.global.u32 \t%r2, [counter];", 1)
    return text


def many_entries(n: int) -> str:
    """A module of n copies of saxpy (renamed): what a large Inductor/CuPy module looks like to prepare."""
    module = parse(PTX)
    saxpy = module.entry("saxpy")
    head = PTX[: module.entries[0].start]
    return head + "".join(saxpy.text.replace("saxpy", f"k{i}") + "\n\n" for i in range(n))


FAKE_PTXAS = r'''#!{python}
import hashlib, os, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("Cuda compilation tools, release 13.0, V13.0.88"); sys.exit(0)
log = os.environ.get("FAKE_PTXAS_LOG")
arch = next(a for a in args if a.startswith("-arch="))[6:]
src, out = args[-1], args[args.index("-o") + 1]
text = open(src).read()
if log:
    with open(log, "a") as f:
        f.write(arch + "\n")
bad = os.environ.get("FAKE_PTXAS_BAD")
if bad:
    for number, line in enumerate(text.splitlines(), start=1):
        if ".entry " + bad + "__tally_" in line:
            print(f"ptxas {{src}}, line {{number + 3}}; error   : Unknown symbol 'boom'", file=sys.stderr)
            sys.exit(255)
open(out, "wb").write(b"\x7fELF" + hashlib.sha256((arch + text).encode()).digest())
'''


@pytest.fixture
def fake_ptxas(tmp_path, monkeypatch):
    """A stand-in ptxas that logs each assembly's -arch and writes a cubin that depends on its input."""
    path = tmp_path / "fake-ptxas"
    path.write_text(FAKE_PTXAS.format(python=sys.executable))
    path.chmod(0o755)
    log = tmp_path / "ptxas.log"
    monkeypatch.setenv("TALLY_PTXAS", str(path))
    monkeypatch.setenv("FAKE_PTXAS_LOG", str(log))
    monkeypatch.delenv("FAKE_PTXAS_BAD", raising=False)
    return lambda: log.read_text().split() if log.exists() else []


def real_ptxas():
    from tally.ptx.ptxas import find_ptxas

    try:
        return find_ptxas()
    except TallyError as exc:
        pytest.skip(f"needs ptxas: {exc}")


# ---------------------------------------------------------------- the format


def entry(image="0123456789abcdef", name="saxpy", nparams=4, fnv="fedcba9876543210", path="/c/x.cubin"):
    return PlanEntry(image, name, nparams, fnv, path)


def test_plan_round_trip(tmp_path):
    entries = [entry(name="zeta"), entry(name="_Z3fooPfi", nparams=0, fnv="0000000000000001",
                                         path="/with space/and  two.cubin"),
               entry(image="00000000000000ff", name="a$b", nparams=1024)]
    path = planmod.write_plan(tmp_path / "plan", entries, ["tally 0.1.0, compiled for sm_90"])
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == HEADER and lines[1] == "# tally 0.1.0, compiled for sm_90" and text.endswith("\n")
    assert lines[2:] == ["slice 00000000000000ff a$b 1024 fedcba9876543210 /c/x.cubin",
                         "slice 0123456789abcdef _Z3fooPfi 0 0000000000000001 /with space/and  two.cubin",
                         "slice 0123456789abcdef zeta 4 fedcba9876543210 /c/x.cubin"]
    plan = read_plan(path)
    assert plan.path == str(path) and set(plan.entries) == set(entries) and plan.comments == ["tally 0.1.0, compiled for sm_90"]


def test_cubin_with_two_paths_is_refused_on_write(tmp_path):
    with pytest.raises(TallyError, match="two paths"):
        plan_text([entry(name="a", path="/x"), entry(name="b", path="/y")])


@pytest.mark.parametrize("text, fragment", [
    ("", "truncated"),
    ("tally-blocksched-plan 1", "truncated"),
    ("tally-blocksched-plan 2\n", "another format version"),
    ("something else\n", "not a tally block-level plan"),
    (HEADER + "\n\n", "line 2: empty line"),
    (HEADER + "\nslice 0123456789abcdef saxpy 4 fedcba9876543210\n", "line 2: expected"),
    (HEADER + "\nptb 0123456789abcdef saxpy 4 fedcba9876543210 /x\n", "unknown kind 'ptb'"),
    (HEADER + "\nslice 0123456789ABCDEF saxpy 4 fedcba9876543210 /x\n", "not 16 lowercase hex"),
    (HEADER + "\nslice 0123456789abcde saxpy 4 fedcba9876543210 /x\n", "not 16 lowercase hex"),
    (HEADER + "\nslice 0123456789abcdef saxpy 4 fedcba987654321g /x\n", "cubin hash"),
    (HEADER + "\nslice 0123456789abcdef sa-xpy 4 fedcba9876543210 /x\n", "not a PTX identifier"),
    (HEADER + "\nslice 0123456789abcdef saxpy 04 fedcba9876543210 /x\n", "not a number"),
    (HEADER + "\nslice 0123456789abcdef saxpy -1 fedcba9876543210 /x\n", "not a number"),
    (HEADER + "\nslice 0123456789abcdef saxpy 1025 fedcba9876543210 /x\n", "not in 0..1024"),
    (HEADER + "\nslice 0123456789abcdef saxpy 4 fedcba9876543210 x.cubin\n", "not absolute"),
    (HEADER + "\nslice 0123456789abcdef saxpy 4 fedcba9876543210 /x\r\n", "carriage return"),
    (HEADER + "\nslice  0123456789abcdef saxpy 4 fedcba9876543210 /x\n", "line 2"),
    (HEADER + "\nslice 0123456789abcdef saxpy 4 fedcba9876543210 /x\n"
              "slice 0123456789abcdef saxpy 4 fedcba9876543210 /x\n", "line 3: kernel saxpy of image"),
    (HEADER + "\nslice 0123456789abcdef a 4 fedcba9876543210 /x\n"
              "slice 0123456789abcdef b 4 fedcba9876543210 /y\n", "line 3: cubin fedcba9876543210 is named by two"),
])
def test_bad_plans_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "plan"
    path.write_text(text)
    with pytest.raises(TallyError, match=re.escape(fragment)) as info:
        read_plan(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unreadable_plans(tmp_path):
    with pytest.raises(TallyError, match="does not exist"):
        read_plan(tmp_path / "missing")
    with pytest.raises(TallyError, match="is a directory"):
        read_plan(tmp_path)
    (tmp_path / "bin").write_bytes(HEADER.encode() + b"\n# \xff\n")
    with pytest.raises(TallyError, match="not UTF-8"):
        read_plan(tmp_path / "bin")


def test_checking_the_cubins(tmp_path):
    data = b"\x7fELF cubin"
    fnv, cubin = planmod.write_cubin(tmp_path / "cubins", data)
    assert cubin == tmp_path / "cubins" / f"{fnv}.cubin" and fnv == f"{fnv1a64(data):016x}"
    path = planmod.write_plan(tmp_path / "plan", [entry(fnv=fnv, path=str(cubin))])
    assert len(read_plan(path, check="hash").entries) == 1
    cubin.write_bytes(b"\x7fELF other")
    assert read_plan(path, check="exists").entries
    with pytest.raises(TallyError, match="has FNV-1a-64"):
        read_plan(path, check="hash")
    cubin.unlink()
    with pytest.raises(TallyError, match="is missing"):
        read_plan(path, check="exists")


# ---------------------------------------------------------------- architectures


@pytest.mark.parametrize("target, requested, arch, why", [
    ("sm_90a", "sm_90", "sm_90a", None),
    ("sm_100f", "sm_100", "sm_100f", None),
    ("sm_90", "sm_90", "sm_90", None),
    ("sm_80", "sm_90", "sm_90", None),
    (None, "sm_90", "sm_90", None),
    ("sm_80", "sm_90a", "sm_90a", None),
    ("sm_100", "sm_90", None, "newer than sm_90"),
    ("sm_100a", "sm_90", None, "newer than sm_90"),
    ("sm_90a", "sm_100", None, "specific to sm_90"),
])
def test_assembly_arch(target, requested, arch, why):
    got, reason = assembly_arch(target, requested)
    assert got == arch and (reason is None if why is None else why in reason)


def test_sm_90a_modules_are_assembled_for_sm_90a(tmp_path, fake_ptxas):
    d = tmp_path / "modules"
    triton = save(d, TRITON.encode())
    newer = save(d, with_target(PTX, "sm_100").encode() + b"\0")
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    assert fake_ptxas() == ["sm_90a"]  # the newer module is never handed to ptxas
    plan = read_plan(tmp_path / "plan", check="hash")
    assert [(e.image, e.entry, e.nparams) for e in plan.entries] == [(triton, "sum_rows", 5)]
    excluded = {(k.image, k.entry): k.reason for k in report.plan_kernels if not k.included}
    assert excluded == {(newer, n): "PTX .target sm_100 is newer than sm_90"
                        for n in ("saxpy", "grid_ids_3d", "add_2d", "exit_early")}
    assert f"{newer} ptx image: saxpy: not in the plan: PTX .target sm_100 is newer than sm_90" in report.lines()


def test_sm_90a_with_the_real_ptxas(tmp_path):
    """Triton's `.target sm_90a` with --compile sm_90: ptxas -arch=sm_90 refuses it; prepare assembles
    for sm_90a (a cubin that runs on sm_90 GPUs)."""
    ptxas = real_ptxas()
    from tally.ptx.ptxas import assemble

    assert not assemble(TRITON, "sm_90", ptxas).ok  # the bug this is about
    d = tmp_path / "modules"
    image = save(d, TRITON.encode())
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    assert [(k.entry, k.status) for k in report.kernels] == [("sum_rows", "ok")], report.text()
    (line,) = read_plan(tmp_path / "plan", check="hash").entries
    assert (line.image, line.entry, line.nparams) == (image, "sum_rows", 5)
    cubin = Path(line.cubin).read_bytes()
    assert cubin.startswith(b"\x7fELF") and b"sum_rows__tally_slice" in cubin


# ---------------------------------------------------------------- prepare writes the plan


def test_prepare_writes_the_plan_and_its_cubins(tmp_path, fake_ptxas):
    d = tmp_path / "modules"
    good = save(d, PTX.encode() + b"\0")
    refused = save(d, REFUSED.encode())
    globals_ = save(d, with_global(PTX).encode())
    gelu = save(d, TRITON_GLOBALS.encode())
    plan_path = tmp_path / "my plans" / "plan"
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=plan_path)
    assert report.plan == str(plan_path)
    plan = read_plan(plan_path, check="hash")
    assert plan.comments[0].startswith("tally ") and "sm_90" in plan.comments[0]
    by_kernel = {(e.image, e.entry): e for e in plan.entries}
    assert {k for k in by_kernel if k[0] == good} == {(good, n) for n in ("saxpy", "grid_ids_3d", "add_2d",
                                                                          "exit_early")}
    assert by_kernel[(good, "saxpy")].nparams == 4
    assert len({e.cubin for e in plan.entries if e.image == good}) == 1  # one cubin per module
    refused_ok = {e.entry for e in plan.entries if e.image == refused}
    assert refused_ok and "grid_sync" not in refused_ok
    for e in plan.entries:
        assert Path(e.cubin) == plan_path.parent / "cubins" / f"{e.cubin_fnv}.cubin"
        assert f"{fnv1a64(Path(e.cubin).read_bytes()):016x}" == e.cubin_fnv
    excluded = {(k.image, k.entry): k.reason for k in report.plan_kernels if not k.included}
    assert "grid-wide sync" in excluded[(refused, "grid_sync")] and excluded[(refused, "grid_sync")].startswith("slice: ")
    for name in ("saxpy", "add_2d"):  # saxpy reads `counter`: its whole module is left out
        assert "module-scope .global/.const variable(s) (counter)" in excluded[(globals_, name)]
    assert not any(e.image == globals_ for e in plan.entries)
    # Triton's `_$_str`, which no instruction uses, keeps nothing out
    assert (gelu, "elementwise_gelu") in by_kernel
    lines = report.lines()
    assert any(line.startswith(f"{globals_} ptx image: saxpy: not in the plan: its module's code uses") for line in lines)
    assert f"plan {plan_path}: {len(plan.entries)} kernel(s), {len(excluded)} left out" in lines[-1]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["plan"] == str(plan_path) and data["summary"]["plan_kernels"] == len(plan.entries)
    assert {(k["image"], k["entry"]) for k in data["plan_kernels"] if not k["included"]} == set(excluded)

    # a second run: all from the cache, nothing assembled, the same plan
    before = plan_path.read_bytes()
    calls = len(fake_ptxas())
    again = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                    plan_path=plan_path)
    assert again.all_cache_hits and len(fake_ptxas()) == calls and plan_path.read_bytes() == before


def test_referenced_globals():
    assert referenced_globals(parse(with_global(PTX, used=False)), ["counter"]) == []
    assert referenced_globals(parse(with_global(PTX)), ["counter"]) == ["counter"]
    assert referenced_globals(parse(TRITON_GLOBALS), ["_$_str"]) == []
    # another variable's initializer counts as a use; a longer name that starts alike does not
    text = with_global(PTX, used=False).replace(
        ".global .align 4 .u32 counter = 7;",
        ".global .align 4 .u32 counter = 7;\n.global .align 8 .u64 where = generic(counter);\n"
        ".global .align 4 .u32 counter2;", 1)
    names = module_globals(parse(text))
    assert names == ["counter", "where", "counter2"]
    assert referenced_globals(parse(text), names) == ["counter"]


def test_module_globals():
    assert module_globals(parse(PTX)) == []
    assert module_globals(parse(with_global(PTX))) == ["counter"]
    assert module_globals(parse(TRITON_GLOBALS)) == ["_$_str"]
    text = PTX.replace(".address_size 64", ".address_size 64\n.extern .shared .align 16 .b8 smem[];\n"
                       ".shared .align 4 .u32 s;\n.const .align 8 .b8 table[16];\n"
                       ".visible .global .align 8 .u64 g;\n.extern .global .u32 ext;\n/* .global .u32 no; */", 1)
    assert module_globals(parse(text)) == ["table", "g", "ext"]


def test_best_matching_source_of_a_fatbin(tmp_path, fake_ptxas):
    """A fatbin with PTX for sm_80, sm_90 and sm_100: --compile sm_90 uses the sm_90 member only."""
    def member(ptx: str, arch: int) -> bytes:
        payload = ptx.encode() + b"\0"
        payload += b"\0" * (-len(payload) % 8)
        head = struct.pack("<HHIQIIHHIIIQQQ", 1, 0x0101, 80, len(payload), 0, 0x40, 0, 9, arch, 0, 0, 0x11, 0, 0)
        return head + b"\0" * (80 - len(head)) + payload

    body = b"".join([member(with_target(PTX, "sm_80"), 80), member(PTX, 90),
                     member(with_target(PTX, "sm_100"), 100)])
    fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    d = tmp_path / "modules"
    stem = save(d, fatbin)
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    assert fake_ptxas() == ["sm_90"]
    assert {k.origin for k in report.kernels} == {"fatbin member sm_90"}
    plan = read_plan(tmp_path / "plan")
    assert sorted(e.entry for e in plan.entries) == sorted(["saxpy", "grid_ids_3d", "add_2d", "exit_early"])
    assert {e.image for e in plan.entries} == {stem}
    sources = {s.origin: s.reason for s in report.images[0].sources}
    assert sources["fatbin member sm_80"] == "not used: fatbin member sm_90 matches sm_90 better"
    assert sources["fatbin member sm_100"] == "not used: PTX .target sm_100 is newer than sm_90"
    # for sm_100 the sm_100 member wins
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_100")
    assert {k.origin for k in report.kernels} == {"fatbin member sm_100"}


# ---------------------------------------------------------------- work per module, not per kernel


@pytest.mark.parametrize("n", [3, 40])
def test_prepare_works_per_module_not_per_kernel(tmp_path, fake_ptxas, monkeypatch, n):
    """The number of parses, transformations and ptxas runs does not grow with the kernels of a module."""
    import importlib

    parse_mod, transform_mod = importlib.import_module("tally.ptx.parse"), importlib.import_module("tally.ptx.transform")
    counts = {"parse": 0, "transform": 0}
    real_parse, real_transform = parse_mod.parse, transform_mod.transform_module

    def counting_parse(*a, **kw):
        counts["parse"] += 1
        return real_parse(*a, **kw)

    def counting_transform(*a, **kw):
        counts["transform"] += 1
        return real_transform(*a, **kw)

    monkeypatch.setattr(parse_mod, "parse", counting_parse)
    monkeypatch.setattr(transform_mod, "transform_module", counting_transform)
    d = tmp_path / "modules"
    save(d, many_entries(n).encode())
    modes = ["slice", "ptb", "preemptible"]
    report = prepare(d, KernelCache(tmp_path / "k"), modes=modes, triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    assert len(report.kernels) == 3 * n and all(k.status == "ok" for k in report.kernels)
    assert counts == {"parse": 1, "transform": 3} and len(fake_ptxas()) == 3
    assert len(read_plan(tmp_path / "plan").entries) == n
    again = prepare(d, KernelCache(tmp_path / "k"), modes=modes, triton_dirs=[], compile_arch="sm_90")
    assert again.all_cache_hits and counts == {"parse": 2, "transform": 3} and len(fake_ptxas()) == 3


def test_one_entry_that_breaks_tally_ptx_does_not_fail_the_others(tmp_path, monkeypatch):
    import tally.ptx.transform

    real = tally.ptx.transform.transform_entry

    def broken(module, entry, mode):
        if entry.name == "add_2d":
            raise RuntimeError("defect")
        return real(module, entry, mode)

    monkeypatch.setattr(tally.ptx.transform, "transform_entry", broken)
    d = tmp_path / "modules"
    save(d, PTX.encode())
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[])
    outcome = {k.entry: (k.status, k.reason) for k in report.kernels}
    assert outcome["add_2d"] == ("refused", "tally.ptx failed: RuntimeError: defect")
    assert {outcome[n] for n in ("saxpy", "grid_ids_3d", "exit_early")} == {("ok", None)}
    monkeypatch.setattr(tally.ptx.transform, "transform_entry", real)
    again = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[])
    assert not again.all_cache_hits  # a defect's outcome is not remembered
    assert all(k.status == "ok" for k in again.kernels)


def test_an_entry_ptxas_rejects_is_left_out_alone(tmp_path, fake_ptxas, monkeypatch):
    monkeypatch.setenv("FAKE_PTXAS_BAD", "add_2d")
    d = tmp_path / "modules"
    save(d, PTX.encode())
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    outcome = {k.entry: (k.status, k.reason) for k in report.kernels}
    assert outcome["add_2d"][0] == "refused"
    assert outcome["add_2d"][1].startswith("ptxas rejected the transformed module: ptxas module.ptx, line")
    assert {outcome[n] for n in ("saxpy", "grid_ids_3d", "exit_early")} == {("ok", None)}
    assert len(fake_ptxas()) == 2
    assert sorted(e.entry for e in read_plan(tmp_path / "plan").entries) == ["exit_early", "grid_ids_3d", "saxpy"]
    again = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90")
    assert again.all_cache_hits and len(fake_ptxas()) == 2
    assert {k.entry: (k.status, k.reason) for k in again.kernels} == outcome


def test_corrupt_module_entries_are_never_trusted(tmp_path, fake_ptxas, capsys):
    d = tmp_path / "modules"
    save(d, PTX.encode())
    cache = KernelCache(tmp_path / "k")
    first = prepare(d, cache, modes=["slice"], triton_dirs=[], compile_arch="sm_90", plan_path=tmp_path / "plan")
    plan_before = (tmp_path / "plan").read_bytes()
    entries = sorted(cache.dir.glob("??/*.entry"))
    assert len(entries) == 2  # the transformed module and its cubin, for mode slice
    for path in entries:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    second = prepare(d, KernelCache(cache.root), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    assert not any(k.cache_hit for k in second.kernels) and "is not trusted" in capsys.readouterr().err
    assert [(k.entry, k.status) for k in second.kernels] == [(k.entry, k.status) for k in first.kernels]
    assert (tmp_path / "plan").read_bytes() == plan_before
    # a verified entry whose outcome does not match the module (not one we wrote) is not trusted either
    from tally.blocksched.cache import Request, ptx_version
    from tally.blocksched.prepare import MODULE_ENTRY

    sha = second.images[0].sources[0].ptx_sha256
    request = Request(sha, MODULE_ENTRY, "slice", "module-cubin:sm_90:13.0.88", ptx_version())
    assert cache.get(request) is not None
    cache.put(request, "ok", _files.canonical_json({"format": "tally-module-result", "version": 1,
                                                    "ok": ["saxpy"], "refused": {}}) + b"\n\x7fELF")
    third = prepare(d, KernelCache(cache.root), modes=["slice"], triton_dirs=[], compile_arch="sm_90")
    assert not any(k.cache_hit for k in third.kernels) and len(third.kernels) == 4
    assert "its entries are not the module's" in capsys.readouterr().err


# ---------------------------------------------------------------- CLI


def cli_env(tmp_path):
    return {"TALLY_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "no-triton"),
            "TRITON_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "no-inductor")}


def test_cli_prepare_writes_the_default_plan_and_shows_it(tmp_path, fake_ptxas):
    env = cli_env(tmp_path)
    image = save(tmp_path / "cache" / "modules", PTX.encode())
    r = CliRunner().invoke(blocksched_group, ["prepare", "--modes", "slice", "--compile", "sm_90"], env=env)
    assert r.exit_code == 0, r.output
    plan_path = tmp_path / "cache" / "blocksched" / "plan"
    assert f"{image} ptx image: saxpy: ok slice (cached 0/1)" in r.output
    assert f"plan {plan_path}: 4 kernel(s), 0 left out" in r.output
    assert len(read_plan(plan_path, check="hash").entries) == 4
    assert list((tmp_path / "cache" / "blocksched" / "cubins").glob("*.cubin"))
    r = CliRunner().invoke(blocksched_group, ["plan", "--verify"], env=env)
    assert r.exit_code == 0 and f"{plan_path}: 4 kernel(s) in 1 cubin(s); every cubin matches its hash" in r.output
    assert f"{image} saxpy (4 parameters): " in r.output
    other = tmp_path / "elsewhere" / "p"
    r = CliRunner().invoke(blocksched_group, ["prepare", "--modes", "slice", "--compile", "sm_90", "--plan",
                                              str(other), "--json"], env=env)
    assert r.exit_code == 0 and json.loads(r.stdout)["plan"] == str(other)
    assert read_plan(other, check="hash").entries[0].cubin.startswith(str(tmp_path / "elsewhere" / "cubins"))
    # without slice no plan is written
    r = CliRunner().invoke(blocksched_group, ["prepare", "--modes", "ptb", "--compile", "sm_90", "--json"], env=env)
    assert r.exit_code == 0 and json.loads(r.stdout)["plan"] is None


@pytest.mark.parametrize("args, fragment", [
    (["--modes", "fast"], "unknown transformation mode 'fast'"),
    (["--modes", "slice,slice"], "names a mode twice"),
    (["--modes", ""], "--modes: expected"),
    (["--plan", "/tmp/x"], "--plan needs --compile"),
    (["--modes", "ptb", "--compile", "sm_90", "--plan", "/tmp/x"], "--plan needs mode slice"),
])
def test_cli_prepare_argument_errors_are_one_line(tmp_path, args, fragment):
    env = dict(os.environ, **cli_env(tmp_path))
    (tmp_path / "cache" / "modules").mkdir(parents=True)
    r = subprocess.run([*TALLY, "blocksched", "prepare", *args], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and fragment in r.stderr, r.stderr
    assert r.stderr.startswith("tally: error: ")


def test_cli_plan_errors_are_one_line(tmp_path):
    env = dict(os.environ, **cli_env(tmp_path))
    r = subprocess.run([*TALLY, "blocksched", "plan"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"tally: error: block-level plan {tmp_path / 'cache' / 'blocksched' / 'plan'} does not exist"]


# ---------------------------------------------------------------- tally run --block-level


@pytest.fixture
def run_env(tmp_path, monkeypatch):
    """`tally run` with exec and the daemon replaced: returns the environment the program would get."""
    from tally import launcher
    from tally.daemon import client

    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TALLY_BLOCKSCHED_PLAN", raising=False)
    seen: dict = {}
    monkeypatch.setattr(launcher, "exec_command", lambda command, env: seen.update(env))
    monkeypatch.setattr(client, "ensure_daemon", lambda auto_up=False: {"params": {}, "mps": True})
    monkeypatch.setattr(client, "version_skew", lambda state: (None, None))
    monkeypatch.setattr(client, "client_env", lambda state, priority: {})

    def run(*args):
        seen.clear()
        result = CliRunner().invoke(launcher.run_command, [*args, "--", "/bin/true"])
        return result, dict(seen)

    return run


def write_plan(path: Path, tmp_path: Path) -> Path:
    fnv, cubin = planmod.write_cubin(path.parent / "cubins", b"\x7fELF")
    return planmod.write_plan(path, [entry(fnv=fnv, path=str(cubin))])


def test_run_block_level_hands_the_plan_to_the_agent(tmp_path, run_env):
    default = write_plan(tmp_path / "cache" / "blocksched" / "plan", tmp_path)
    result, env = run_env("--priority", "best-effort", "--block-level")
    assert result.exit_code == 0, result.output
    assert env["TALLY_BLOCKSCHED_PLAN"] == str(default)
    mine = write_plan(tmp_path / "mine" / "plan", tmp_path)
    os.chdir(tmp_path)
    result, env = run_env("--priority", "best-effort", "--block-level", "--plan", "mine/plan")
    assert result.exit_code == 0 and env["TALLY_BLOCKSCHED_PLAN"] == str(mine)
    result, env = run_env("--priority", "best-effort")
    assert result.exit_code == 0 and "TALLY_BLOCKSCHED_PLAN" not in env


def test_run_block_level_keeps_the_last_runs_stats_for_show(tmp_path, run_env):
    from tally.blocksched import live

    write_plan(tmp_path / "cache" / "blocksched" / "plan", tmp_path)
    directory = live.live_dir(["/bin/true"])
    directory.mkdir(parents=True)
    (directory / "stats-1.json").write_text("{}")  # an earlier run's
    (directory / "keep.txt").write_text("not ours")
    result, env = run_env("--priority", "best-effort", "--block-level")
    assert result.exit_code == 0, result.output
    assert env["TALLY_STATS_DIR"] == str(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]
    # --stats-dir wins, and the live directory is left alone
    (directory / "stats-2.json").write_text("{}")
    result, env = run_env("--priority", "best-effort", "--block-level", "--stats-dir", str(tmp_path / "s"))
    assert result.exit_code == 0 and env["TALLY_STATS_DIR"] == str(tmp_path / "s")
    assert (directory / "stats-2.json").exists()
    result, env = run_env("--priority", "best-effort")
    assert "TALLY_STATS_DIR" not in env
    # a live directory that cannot be made is a warning: the run goes on without it
    shutil.rmtree(directory.parent)
    directory.parent.write_text("a file where the live directories go")
    result, env = run_env("--priority", "best-effort", "--block-level")
    assert result.exit_code == 0 and "TALLY_STATS_DIR" not in env and "TALLY_BLOCKSCHED_PLAN" in env
    assert "tally: warning: cannot prepare the block-level stats directory" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--block-level"], "--block-level needs --priority best-effort"),
    (["--priority", "high", "--block-level"], "--block-level needs --priority best-effort"),
    (["--plan", "x"], "--plan needs --block-level"),
    (["--priority", "best-effort", "--plan", "x"], "--plan needs --block-level"),
    (["--priority", "best-effort", "--block-level"], "run `tally blocksched prepare --compile sm_XX` first"),
    (["--priority", "best-effort", "--block-level", "--plan", "/nonexistent/plan"],
     "no block-level plan at /nonexistent/plan"),
])
def test_run_block_level_errors_are_one_line(tmp_path, args, fragment):
    env = dict(os.environ, TALLY_CACHE_DIR=str(tmp_path / "cache"), TALLY_RUNTIME_DIR=str(tmp_path / "rt"),
               TALLY_SHM_DIR=str(tmp_path))
    r = subprocess.run([*TALLY, "run", *args, "--", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("tally: error: ") and fragment in r.stderr and "Traceback" not in r.stderr


def test_run_block_level_with_a_bad_plan(tmp_path):
    env = dict(os.environ, TALLY_CACHE_DIR=str(tmp_path / "cache"), TALLY_RUNTIME_DIR=str(tmp_path / "rt"),
               TALLY_SHM_DIR=str(tmp_path))
    plan = tmp_path / "cache" / "blocksched" / "plan"
    plan.parent.mkdir(parents=True)
    plan.write_text(HEADER + "\nslice nothex saxpy 4 fedcba9876543210 /x\n")
    r = subprocess.run([*TALLY, "run", "--priority", "best-effort", "--block-level", "--", "true"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"tally: error: block-level plan {plan}: line 2: image 'nothex' is not 16 lowercase hex digits"]
    plan.write_text(HEADER + "\nslice 0123456789abcdef saxpy 4 fedcba9876543210 /nonexistent.cubin\n")
    r = subprocess.run([*TALLY, "run", "--priority", "best-effort", "--block-level", "--", "true"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "is missing" in r.stderr


def test_modules_with_external_functions_are_left_out_of_the_plan(tmp_path, fake_ptxas):
    """ptxas assembles them as relocatable code (-c), which the agent cannot load without linking."""
    d = tmp_path / "modules"
    stem = save(d, (ROOT / "cuda" / "dynamic_parallelism.ptx").read_bytes())
    report = prepare(d, KernelCache(tmp_path / "k"), modes=["slice"], triton_dirs=[], compile_arch="sm_90",
                     plan_path=tmp_path / "plan")
    excluded = {k.entry: k.reason for k in report.plan_kernels if not k.included}
    assert [k.status for k in report.kernels if k.entry == "child"] == ["ok"]
    assert "external functions (__cudaCDP2GetParameterBufferV2, __cudaCDP2LaunchDeviceV2)" in excluded["child"]
    assert "dynamic parallelism" in excluded["parent"]
    assert read_plan(tmp_path / "plan").entries == [] and stem
