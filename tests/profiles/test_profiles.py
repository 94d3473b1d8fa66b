"""Profile files (tally.profiles): the format round-trips, anything else is one
TallyError, writes are atomic, program identities, seeding from a trace, and
the `tally profiles` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally import profiles as pf
from tally.errors import TallyError

P = pf.Profile


def sample() -> list[pf.Profile]:
    return [
        P("_Z6gemm_fPKfS0_Pfiii", 4096, 30_000, 12),
        P("_Z6gemm_fPKfS0_Pfiii", 8192, 61_000, 3),
        P("void at::native::kernel<4, float>(int)", 0, 1, 1),  # spaces: the name is the rest of the line
        P("utf8_\u00e9t\u00e9", 2**64 - 1, 2**63 - 1, 2**63 - 1),
    ]


def test_fnv1a64_known_values():
    # Reference values of 64-bit FNV-1a.
    assert pf.fnv1a64("") == 0xCBF29CE484222325
    assert pf.fnv1a64("a") == 0xAF63DC4C8601EC8C
    assert pf.fnv1a64("foobar") == 0x85944171F73967E8
    assert pf.fnv1a64(b"foobar") == pf.fnv1a64("foobar")


def test_round_trip_and_layout():
    data = pf.dumps(sample())
    lines = data.split(b"\n")
    assert lines[0] == b"tally-profiles 1 4" and lines[-1] == b""
    # most samples first
    assert lines[1].endswith(b" utf8_\xc3\xa9t\xc3\xa9")
    h = pf.fnv1a64("_Z6gemm_fPKfS0_Pfiii")
    assert lines[2] == f"{h:016x} 4096 30000 12 _Z6gemm_fPKfS0_Pfiii".encode()
    parsed = pf.parse(data)
    assert sorted(parsed.values(), key=lambda p: p.key) == sorted(sample(), key=lambda p: p.key)
    assert pf.dumps(parsed.values()) == data


def test_write_read_atomic(tmp_path):
    path = tmp_path / "deep" / "dir" / "p.txt"
    pf.write(path, sample())
    assert pf.read(path) == {p.key: p for p in sample()}
    assert [q.name for q in path.parent.iterdir()] == ["p.txt"]  # no temporary left
    assert pf.read(tmp_path / "missing.txt") == {}
    with pytest.raises(TallyError, match="no profile file"):
        pf.read(tmp_path / "missing.txt", missing_ok=False)


def test_concurrent_writers_never_show_half_a_file(tmp_path):
    path = tmp_path / "p.txt"
    big = [P(f"_Z6kernel{i}v", i, 1000 + i, 1 + i) for i in range(2000)]
    small = big[:3]
    pf.write(path, small)
    stop = threading.Event()
    errors: list[Exception] = []

    def writer(profiles):
        while not stop.is_set():
            pf.write(path, profiles)

    threads = [threading.Thread(target=writer, args=(x,)) for x in (big, small)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            try:
                n = len(pf.read(path))
                assert n in (3, 2000)
            except TallyError as exc:  # pragma: no cover - the failure being tested for
                errors.append(exc)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


def test_unstorable_names_are_left_out_and_the_cap_keeps_the_most_sampled():
    data = pf.dumps([P("a\nb", 1, 1, 1), P("", 1, 1, 1), P("x" * 4096, 1, 1, 1), P("x" * 4095, 1, 1, 1)])
    assert len(pf.parse(data)) == 1
    many = [P(f"k{i}", 1, 10, i + 1) for i in range(pf.MAX_KERNELS + 10)]
    kept = pf.parse(pf.dumps(many))
    assert len(kept) == pf.MAX_KERNELS
    assert min(p.samples for p in kept.values()) == 11


def test_merge_newer_estimate_wins_and_samples_add():
    old = {p.key: p for p in sample()}
    new = [P("_Z6gemm_fPKfS0_Pfiii", 4096, 25_000, 5), P("_Z3newv", 32, 7, 2)]
    merged = pf.merge(old, new)
    gemm = merged[P("_Z6gemm_fPKfS0_Pfiii", 4096, 0, 0).key]
    assert (gemm.est_ns, gemm.samples) == (25_000, 17)
    assert merged[new[1].key] == new[1]
    assert len(merged) == len(old) + 1


GOOD = pf.dumps(sample())


@pytest.mark.parametrize("data, fragment", [
    (b"", "not a tally profile file"),
    (b"\x7fELF\x02\x01\x01", "not a tally profile file"),
    (b"# some other tool\n", "not a tally profile file"),
    (b"tally-profiles 2 0\n", "version 2"),
    (b"tally-profiles 2\n", "version 2"),
    (b"tally-profiles 1\n", "malformed profile file header"),
    (b"tally-profiles 01 0\n", "malformed"),
    (b"tally-profiles 1 5000\n", "more than 4096"),
    (GOOD[:-1], "truncated or corrupt"),                       # last newline missing
    (GOOD[: GOOD.rindex(b"\n", 0, -1) + 1], "truncated or corrupt"),  # a whole line missing
    (GOOD + b"x", "bytes after its last kernel"),
    (GOOD.replace(b"gemm_f", b"gemm_g", 1), "does not match its hash"),
    (GOOD.replace(b" 30000 ", b" 030000 ", 1), "truncated or corrupt"),
    (GOOD.replace(b" 30000 ", b" 0 ", 1), "out of range"),
    (GOOD.replace(b" 30000 12 ", b" 30000 0 ", 1), "out of range"),
])
def test_bad_files_are_one_line_errors(data, fragment):
    with pytest.raises(TallyError) as exc:
        pf.parse(data, "prof.txt")
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_duplicate_kernel_is_corrupt():
    line = GOOD.split(b"\n")[2] + b"\n"
    data = b"tally-profiles 1 2\n" + line + line
    with pytest.raises(TallyError, match="listed twice"):
        pf.parse(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_junk_raises_only_tally_error(data):
    try:
        pf.parse(data)
    except TallyError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255), st.booleans())
def test_mutated_files_raise_only_tally_error(pos, byte, truncate):
    data = GOOD[:pos] if truncate else GOOD[:pos] + bytes([byte]) + GOOD[pos + 1:]
    try:
        got = pf.parse(data)
    except TallyError:
        return
    # A mutation that still parses is a well-formed file (e.g. a digit changed).
    assert pf.parse(pf.dumps(got.values())) == got


names = st.text(st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), min_size=1,
                max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, st.integers(0, 2**64 - 1), st.integers(1, 2**63 - 1),
                          st.integers(1, 2**63 - 1)), max_size=20))
def test_round_trip_property(items):
    profiles = {}
    for name, g, est, n in items:
        p = P(name, g, est, n)
        profiles[p.key] = p
    assert pf.parse(pf.dumps(profiles.values())) == profiles


# ------------------------------------------------------------ program keys


def test_program_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text("")
    py = sys.executable
    real_py = os.path.realpath(py)
    ident = pf.program_identity
    assert ident([py, "train.py", "--epochs", "3"]) == f"{real_py}\0{script}"
    assert ident([py, "-u", "-W", "ignore", "train.py"]) == ident([py, "train.py", "--lr", "1"])
    assert ident([py, "-Wignore", "-X", "dev", "--", "train.py"]) == f"{real_py}\0{script}"
    assert ident([py, "-m", "torch.distributed.run", "x.py"]) == f"{real_py}\0-m torch.distributed.run"
    assert ident([py, "-um", "pkg.mod"]) == f"{real_py}\0-m pkg.mod"
    assert ident([py, "-mpkg.mod"]) == f"{real_py}\0-m pkg.mod"
    assert ident([py, "-c", "print(1)"]) == f"{real_py}\0-c"
    assert ident([py]) == f"{real_py}\0-"
    # not an interpreter: the executable alone
    assert ident(["/bin/true", "a", "b"]) == os.path.realpath("/bin/true")
    assert ident(["true", "x"], env_path="/bin:/usr/bin") in (os.path.realpath("/bin/true"),
                                                              os.path.realpath("/usr/bin/true"))


def test_profile_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    a = pf.profile_path([sys.executable, "train.py", "--bs", "64"])
    assert a.parent == tmp_path / "cache" / "profiles"
    assert a.name.startswith("train.py-") and a.suffix == ".txt"
    assert a == pf.profile_path([sys.executable, "-u", str(tmp_path / "train.py")])
    assert a != pf.profile_path([sys.executable, "serve.py"])
    assert pf.profile_path([sys.executable, "-m", "pkg.mod"]).name.startswith("pkg.mod-")


# ---------------------------------------------------------------- seeding


def kernel(name, dur, grid=(2, 1, 1), block=(64, 1, 1)):
    return {"type": "kernel", "name": "demangled", "mangled": name, "grid": list(grid), "block": list(block),
            "start_ns": 100, "end_ns": 100 + dur}


def test_from_trace_means_per_name_and_threads():
    recs = [kernel("_Z1av", 1000), kernel("_Z1av", 3000), kernel("_Z1av", 5000, grid=(1, 2, 1)),
            kernel("_Z1av", 9000, grid=(4, 1, 1)), kernel("_Z1bv", 7), kernel("bad\nname", 5),
            {"type": "meta"}]
    got = {(p.name, p.grid_threads): (p.est_ns, p.samples) for p in pf.from_trace(recs)}
    assert got == {("_Z1av", 128): (3000, 3), ("_Z1av", 256): (9000, 1), ("_Z1bv", 128): (7, 1)}


def tally(*args, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "tally", *args], capture_output=True, text=True, timeout=60,
                          env=e, **kw)


def write_trace(path: Path, command: list[str], records: list[dict]) -> None:
    lines = [{"type": "meta", "version": 1, "command": command, "exit_code": 0}, *records]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_seed_command_writes_the_programs_file(tmp_path):
    env = {"TALLY_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "train.py").write_text("")
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [sys.executable, "train.py"], [kernel("_Z1av", 30_000), kernel("_Z1av", 30_000)])
    r = tally("profiles", "seed", str(trace), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = tally("profiles", "path", "--", sys.executable, "train.py", env=env, cwd=tmp_path)
    path = Path(r2.stdout.strip())
    assert str(path) in r.stderr
    (p,) = pf.read(path, missing_ok=False).values()
    assert (p.name, p.grid_threads, p.est_ns, p.samples) == ("_Z1av", 128, 30_000, 2)
    # seeding again: the trace's estimate, samples add up; an explicit command and --file agree
    write_trace(trace, ["ignored"], [kernel("_Z1av", 10_000)])
    r = tally("profiles", "seed", str(trace), "--", sys.executable, "train.py", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (p,) = pf.read(path).values()
    assert (p.est_ns, p.samples) == (10_000, 3)
    r = tally("profiles", "seed", "--replace", "--file", str(path), str(trace), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (p,) = pf.read(path).values()
    assert (p.est_ns, p.samples) == (10_000, 1)
    r = tally("profiles", "show", "--file", str(path), env=env)
    assert r.returncode == 0 and "10.0 us" in r.stdout and "1 kernel(s)" in r.stdout


def test_seed_replaces_a_corrupt_file_with_a_warning(tmp_path):
    target = tmp_path / "p.txt"
    target.write_bytes(b"garbage")
    trace = tmp_path / "t.jsonl"
    write_trace(trace, ["x"], [kernel("_Z1av", 500)])
    r = tally("profiles", "seed", "--file", str(target), str(trace))
    assert r.returncode == 0, r.stderr
    assert "tally: warning:" in r.stderr and "not a tally profile file" in r.stderr
    assert len(pf.read(target)) == 1


@pytest.mark.parametrize("args, fragment", [
    (["profiles", "show", "--file", "{bad}"], "truncated or corrupt"),
    (["profiles", "show", "--file", "{missing}"], "no profile file"),
    (["profiles", "seed", "{missing}"], "cannot read trace"),
    (["profiles", "seed", "{empty_trace}"], "no kernel records"),
    (["profiles", "show"], "which program?"),
])
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    (tmp_path / "bad").write_bytes(b"tally-profiles 1 1\nnope\n")
    write_trace(tmp_path / "empty.jsonl", ["x"], [])
    paths = {"bad": tmp_path / "bad", "missing": tmp_path / "missing", "empty_trace": tmp_path / "empty.jsonl"}
    r = tally(*[a.format(**paths) for a in args])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tally: error: ") and fragment in lines[0], r.stderr


def test_launcher_passes_the_profile_file_for_best_effort(monkeypatch, tmp_path):
    """`tally run --priority best-effort` hands the agent TALLY_PROFILE_FILE (the daemon is faked)."""
    from click.testing import CliRunner

    import tally.daemon.client as client
    from tally import launcher

    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TALLY_PROFILE_FILE", raising=False)
    monkeypatch.setattr(client, "ensure_daemon", lambda auto_up=False: {})
    monkeypatch.setattr(client, "client_env", lambda state, priority: {})
    seen = {}
    monkeypatch.setattr(launcher, "exec_command", lambda command, env: seen.update(env))
    for priority, expected in (("best-effort", True), ("high", False)):
        seen.clear()
        r = CliRunner().invoke(launcher.run_command, ["--priority", priority, "--", "/bin/true", "x"])
        assert r.exit_code == 0, r.output
        assert ("TALLY_PROFILE_FILE" in seen) == expected
    seen.clear()
    CliRunner().invoke(launcher.run_command, ["--priority", "best-effort", "--", "/bin/true"])
    assert seen["TALLY_PROFILE_FILE"] == str(pf.profile_path(["/bin/true"]))
    monkeypatch.setenv("TALLY_PROFILE_FILE", "/my/own")  # the user's choice wins
    CliRunner().invoke(launcher.run_command, ["--priority", "best-effort", "--", "/bin/true"])
    assert seen["TALLY_PROFILE_FILE"] == "/my/own"


def test_fnv1a64_c_and_python_agree_on_long_inputs():
    """Long inputs (saved code images) go through the agent's C `tally_fnv1a64`; the name
    files the agent writes and the check Python makes must agree byte for byte."""
    import os

    from tally import files

    assert files._agent_fnv1a64() is not None, "the built agent exports tally_fnv1a64"
    data = os.urandom(100_000)
    h = files._FNV_OFFSET
    for b in data:
        h = ((h ^ b) * files._FNV_PRIME) & files._MASK64
    assert files.fnv1a64(data) == h
    assert files.fnv1a64(b"") == files._FNV_OFFSET and pf.fnv1a64("a") == 0xAF63DC4C8601EC8C
