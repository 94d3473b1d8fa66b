"""Fixtures for the agent tests: build the libcuda / libcupti test doubles.

The doubles (tests/agent/doubles/*.c) are compiled with gcc once per session into
pytest's temporary directory. Without gcc the whole agent suite is skipped.
The agent under test is the installed package's libtally_agent.so.

For the scheduling path (test_sched.py) the tests act as the tally daemon: the
`daemon` fixture creates a real scoreboard file and keeps its heartbeat fresh,
and `spawn_app` starts the fake application without waiting for it, so a test
can watch and change the scoreboard while the application runs.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tally.scoreboard import PolicyParams, Scoreboard

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
    # TALLY_TEST_AGENT: test another build of the agent (e.g. an older one, to see a test fail)
    agent = Path(os.environ.get("TALLY_TEST_AGENT") or str(importlib.resources.files("tally") / "libtally_agent.so"))
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

    @property
    def launches(self) -> list[tuple[int, int]]:
        """(call_ns, ret_ns) of each timed launch (launch:ENTRY:N:DUR_US...), in print order."""
        return [(int(m.group(1)), int(m.group(2))) for m in _TIMED.finditer(self.stdout)]

    def gpu(self, name: str) -> int:
        """A fake-GPU counter the app printed at its end (gpu_NAME or writes_STREAM)."""
        return int(self.values[name])


_LINE = re.compile(r"^fake_app: (called )?([^=\s]+)=(.*)$")
_TIMED = re.compile(r"^fake_app: launch i=\d+ call_ns=(\d+) ret_ns=(\d+)$", re.M)


def _app_env(doubles: Doubles, stats_dir: Path, cupti, trace_dir: Path | None, inject: bool,
             env: dict[str, str | None] | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("TALLY_", "FAKE_")) and k != "CUDA_INJECTION64_PATH"}
    e["FAKE_APP_LIB_ROOT"] = str(doubles.root) + "/"
    e["TALLY_STATS_DIR"] = str(stats_dir)
    if inject:
        e["CUDA_INJECTION64_PATH"] = str(doubles.agent)
    if cupti is not None:
        e["TALLY_CUPTI_PATH"] = str(cupti)
    if trace_dir is not None:
        e["TALLY_TRACE_DIR"] = str(trace_dir)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def _parse(r: AppRun) -> AppRun:
    for line in r.stdout.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        if m.group(1):
            r.called[m.group(2)] = int(m.group(3))
        else:
            r.values.setdefault(m.group(2), m.group(3))
    return r


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
        if trace:
            trace_dir = tmp_path / f"trace{n}"
            trace_dir.mkdir()
        e = _app_env(doubles, stats_dir, cupti, trace_dir, inject, env)
        proc = subprocess.Popen([str(doubles.app), *steps], env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", cwd=tmp_path)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"fake_app {' '.join(steps)} hung (killed after {timeout} s); stderr:\n{err}")
        return _parse(AppRun(proc.pid, proc.returncode, out, err, stats_dir, trace_dir))

    return run


class RunningApp:
    """A fake application started in the background; stdout is read as it comes."""

    def __init__(self, proc: subprocess.Popen, stats_dir: Path, steps: tuple[str, ...]):
        self.proc = proc
        self.pid = proc.pid
        self.stats_dir = stats_dir
        self.steps = steps
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(proc.stdout, self._lines), daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, sink: queue.Queue) -> None:
        for line in stream:
            sink.put(line)
        sink.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._err.append(line)

    def next_line(self, timeout: float) -> str | None:
        """The next stdout line, or None at its end; fails the test after timeout."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            pytest.fail(f"fake_app {' '.join(self.steps)}: no output for {timeout} s; stderr:\n{''.join(self._err)}")
        if line is not None:
            self._out.append(line)
        return line

    def wait_for(self, prefix: str, timeout: float = 30) -> str:
        """Reads stdout up to the first line starting with `fake_app: <prefix>`."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.01, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"fake_app ended before printing {prefix!r}; stderr:\n{''.join(self._err)}")
            if line.startswith(f"fake_app: {prefix}"):
                return line

    def printed(self, prefix: str) -> bool:
        """Whether a line starting with `fake_app: <prefix>` has come (without waiting)."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                break
            self._out.append(line)
        return any(line.startswith(f"fake_app: {prefix}") for line in self._out)

    @property
    def output(self) -> str:
        """stdout read so far (by wait_for / printed)."""
        return "".join(self._out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, timeout: float = 30) -> AppRun:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"fake_app {' '.join(self.steps)} hung (killed after {timeout} s); "
                        f"stderr:\n{''.join(self._err)}")
        while self.next_line(timeout=10) is not None:
            pass
        for t in self._readers:
            t.join(timeout=10)
        return _parse(AppRun(self.pid, self.proc.returncode, "".join(self._out), "".join(self._err),
                             self.stats_dir, None))


@pytest.fixture
def spawn_app(doubles: Doubles, tmp_path):
    """Start the fake application with the agent injected, without waiting for it
    (same arguments as run_app). Whatever is still running at the end is killed."""
    counter = iter(range(1_000_000))
    started: list[RunningApp] = []

    def spawn(*steps: str, cupti: Path | str | None = doubles.cupti,
              env: dict[str, str | None] | None = None) -> RunningApp:
        stats_dir = tmp_path / f"spawned-stats{next(counter)}"
        stats_dir.mkdir()
        e = _app_env(doubles, stats_dir, cupti, None, True, env)
        proc = subprocess.Popen([str(doubles.app), *steps], env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", cwd=tmp_path)
        app = RunningApp(proc, stats_dir, steps)
        started.append(app)
        return app

    yield spawn
    for app in started:
        app.kill()


# ------------------------------------------------------------------ daemon

FAKE_UUID = "GPU-5c3c1a2b-0011-2233-4455-66778899aabb"


class FakeDaemon:
    """Plays the tally daemon for the agent: owns a scoreboard in a temporary
    directory and refreshes its heartbeat every 10 ms from a thread."""

    def __init__(self, directory: Path, uuid: str = FAKE_UUID, params: PolicyParams | None = None):
        self.directory = directory
        self.uuid = uuid
        self.prefix = f"{directory}/tally-0-"
        self.path = Path(self.prefix + uuid)
        self.sb = Scoreboard.create(self.path, uuid, params or PolicyParams())
        self._beating = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self.start_heartbeat()
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            if self._beating.is_set():
                self.sb.daemon_heartbeat_ns = time.monotonic_ns()
            time.sleep(0.01)

    def start_heartbeat(self) -> None:
        self.sb.daemon_heartbeat_ns = time.monotonic_ns()
        self._beating.set()

    def stop_heartbeat(self) -> int:
        """Stops refreshing the heartbeat (as if the daemon died); returns its last value."""
        self._beating.clear()
        time.sleep(0.03)  # a refresh in progress has landed
        return self.sb.daemon_heartbeat_ns

    def env(self, priority: str, **extra: str | None) -> dict[str, str | None]:
        e: dict[str, str | None] = {"TALLY_PRIORITY": priority, "TALLY_SCOREBOARD_PREFIX": self.prefix,
                                    "FAKE_CUDA_UUID": self.uuid}
        e.update(extra)
        return e

    def slots_of(self, pid: int) -> list[int]:
        return [i for i in range(64) if self.sb.slot_get(i, "pid") == pid]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sb.close()


@pytest.fixture
def daemon(tmp_path):
    """A FakeDaemon with the default policy parameters; tests change them via d.sb."""
    d = FakeDaemon(tmp_path)
    yield d
    d.close()
