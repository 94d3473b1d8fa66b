"""Fixtures for the agent tests: build the libcuda / libcupti test doubles.

The doubles (tests/agent/doubles/*.c) are compiled with gcc once per session into
pytest's temporary directory. Without gcc the whole agent suite is skipped.
The agent under test is the installed package's libtally_agent.so.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOUBLES = Path(__file__).parent / "doubles"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fPIC", "-fvisibility=hidden"]


@dataclass
class Doubles:
    root: Path
    agent: Path
    libcuda: Path
    cupti: Path               # the good libcupti double
    cupti_no_enable: Path     # lacks cuptiEnableCallback (a required symbol)
    cupti_no_activity: Path   # lacks the Activity API
    profiler: Path            # another injection library that subscribes to CUPTI
    app: Path


def _gcc(gcc: str, args: list[str]) -> None:
    proc = subprocess.run([gcc, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"gcc {' '.join(args)} failed:\n{proc.stderr}")


@pytest.fixture(scope="session")
def doubles(tmp_path_factory) -> Doubles:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: the agent tests build C test doubles of libcuda and libcupti")
    agent = Path(str(importlib.resources.files("tally") / "libtally_agent.so"))
    assert agent.is_file(), f"the installed package has no agent at {agent} (pip install -e .)"
    root = tmp_path_factory.mktemp("agent_doubles")
    dirs = {name: root / name for name in ("cuda", "cupti", "cupti_no_enable", "cupti_no_activity", "profiler", "bin")}
    for d in dirs.values():
        d.mkdir()
    inc = ["-I", str(DOUBLES)]
    src = lambda name: str(DOUBLES / name)  # noqa: E731
    d = Doubles(
        root=root,
        agent=agent,
        libcuda=dirs["cuda"] / "libcuda.so.1",
        cupti=dirs["cupti"] / "libcupti.so",
        cupti_no_enable=dirs["cupti_no_enable"] / "libcupti.so",
        cupti_no_activity=dirs["cupti_no_activity"] / "libcupti.so",
        profiler=dirs["profiler"] / "libfake_profiler.so",
        app=dirs["bin"] / "fake_app",
    )
    _gcc(gcc, [*CFLAGS, *inc, "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(d.libcuda),
               src("fake_cuda.c"), "-ldl", "-lpthread"])
    for out, defines in ((d.cupti, []), (d.cupti_no_enable, ["-DFAKE_CUPTI_WITHOUT_ENABLE_CALLBACK"]),
                         (d.cupti_no_activity, ["-DFAKE_CUPTI_WITHOUT_ACTIVITY"])):
        _gcc(gcc, [*CFLAGS, *inc, *defines, "-shared", "-Wl,-soname,libcupti.so", "-o", str(out),
                   src("fake_cupti.c"), "-ldl", "-lpthread"])
    _gcc(gcc, [*CFLAGS, *inc, "-shared", "-o", str(d.profiler), src("fake_profiler.c"),
               f"-L{d.cupti.parent}", "-lcupti", f"-Wl,-rpath,{d.cupti.parent}"])
    # -rdynamic: the app's dlopen interposer must be visible to the agent.
    _gcc(gcc, ["-std=c11", "-O2", "-Wall", "-Wextra", *inc, "-rdynamic", "-o", str(d.app),
               src("fake_app.c"), f"-L{d.libcuda.parent}", "-l:libcuda.so.1",
               f"-Wl,-rpath,{d.libcuda.parent}", "-ldl", "-lpthread"])
    return d


@dataclass
class AppRun:
    pid: int
    returncode: int
    stdout: str
    stderr: str
    stats_dir: Path
    trace_dir: Path | None
    values: dict[str, str] = field(default_factory=dict)   # "fake_app: key=value"
    called: dict[str, int] = field(default_factory=dict)   # "fake_app: called NAME=N"

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def stats(self, pid: int | None = None) -> dict:
        path = self.stats_dir / f"stats-{self.pid if pid is None else pid}.json"
        assert path.is_file(), f"no {path.name}; stats dir has {sorted(p.name for p in self.stats_dir.iterdir())}"
        return json.loads(path.read_text())

    def trace_lines(self) -> list[str]:
        assert self.trace_dir is not None
        path = self.trace_dir / f"trace-{self.pid}.jsonl"
        assert path.is_file(), f"no {path.name}"
        text = path.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n")
        return text.splitlines()

    def trace(self) -> list[dict]:
        return [json.loads(line) for line in self.trace_lines()]


_LINE = re.compile(r"^fake_app: (called )?([^=]+)=(.*)$")


@pytest.fixture
def run_app(doubles: Doubles, tmp_path):
    """Run the fake application with the agent injected.

    cupti: a path for TALLY_CUPTI_PATH, or None to leave it unset.
    trace: set TALLY_TRACE_DIR to a fresh directory.
    env: extra variables (a value of None removes the variable).
    """
    counter = iter(range(1_000_000))

    def run(*steps: str, cupti: Path | str | None = doubles.cupti, trace: bool = False,
            env: dict[str, str | None] | None = None, inject: bool = True, timeout: float = 60) -> AppRun:
        n = next(counter)
        stats_dir = tmp_path / f"stats{n}"
        stats_dir.mkdir()
        trace_dir = None
        e = {k: v for k, v in os.environ.items()
             if not k.startswith(("TALLY_", "FAKE_")) and k != "CUDA_INJECTION64_PATH"}
        e["FAKE_APP_LIB_ROOT"] = str(doubles.root) + "/"
        e["TALLY_STATS_DIR"] = str(stats_dir)
        if inject:
            e["CUDA_INJECTION64_PATH"] = str(doubles.agent)
        if cupti is not None:
            e["TALLY_CUPTI_PATH"] = str(cupti)
        if trace:
            trace_dir = tmp_path / f"trace{n}"
            trace_dir.mkdir()
            e["TALLY_TRACE_DIR"] = str(trace_dir)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        proc = subprocess.Popen([str(doubles.app), *steps], env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", cwd=tmp_path)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"fake_app {' '.join(steps)} hung (killed after {timeout} s); stderr:\n{err}")
        r = AppRun(proc.pid, proc.returncode, out, err, stats_dir, trace_dir)
        for line in out.splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            if m.group(1):
                r.called[m.group(2)] = int(m.group(3))
            else:
                r.values.setdefault(m.group(2), m.group(3))
        return r

    return run
