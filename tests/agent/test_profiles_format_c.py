"""The agent's profile-file reader (agent/profiles.c) accepts exactly what the
reference reader (tally.profiles.parse) accepts, and reads the same values.

agent/profiles.c is compiled from the source tree into a small harness that
loads TALLY_PROFILE_FILE as the agent does at join and looks keys up.
"""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tally import profiles as pf
from tally.errors import TallyError

AGENT_SRC = Path(__file__).resolve().parents[2] / "agent"

HARNESS = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include "agent.h"
int main(int argc, char **argv) {
    tally_profiles_load();
    for (int i = 1; i + 1 < argc; i += 2) {
        uint64_t est, n, h = strtoull(argv[i], NULL, 16), g = strtoull(argv[i + 1], NULL, 10);
        if (tally_profiles_seed(h, g, &est, &n)) printf("%llu %llu\n", (unsigned long long)est, (unsigned long long)n);
        else printf("none\n");
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("profiles_c")
    (d / "harness.c").write_text(HARNESS)
    exe = d / "harness"
    subprocess.run([gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(AGENT_SRC), "-o", str(exe),
                    str(d / "harness.c"), str(AGENT_SRC / "profiles.c"), "-lpthread"], check=True)

    def read(path: Path, keys: list[tuple[int, int]]) -> tuple[str, list[str]]:
        args = [str(exe)]
        for h, g in keys:
            args += [f"{h:016x}", str(g)]
        r = subprocess.run(args, env={"TALLY_PROFILE_FILE": str(path)}, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stderr, r.stdout.splitlines()

    return read


GOOD = [pf.Profile("_Z6gemm_fPKfS0_Pfiii", 4096, 30_000, 12), pf.Profile("a b\tc", 0, 1, 1),
        pf.Profile("utf8_\u00e9", 2**64 - 1, 2**63 - 1, 2**63 - 1)]


def test_c_reads_what_python_writes(reader, tmp_path):
    path = tmp_path / "p.txt"
    pf.write(path, GOOD)
    err, out = reader(path, [p.key for p in GOOD] + [(1, 2)])
    assert err == ""
    assert out == [f"{p.est_ns} {p.samples}" for p in GOOD] + ["none"]
    err, out = reader(tmp_path / "missing.txt", [GOOD[0].key])
    assert err == "" and out == ["none"]  # no file yet: nothing to say


def test_c_and_python_agree_on_mutated_files(reader, tmp_path):
    good = pf.dumps(GOOD)
    rng = random.Random(1234)
    cases = [b"", b"tally-profiles 1 0\n", b"tally-profiles 1 0", b"tally-profiles 1 00\n",
             b"tally-profiles 2 0\n", good + b"\n", good.replace(b"\n", b"\r\n")]
    for _ in range(120):
        pos = rng.randrange(len(good))
        kind = rng.randrange(3)
        if kind == 0:
            cases.append(good[:pos])
        elif kind == 1:
            cases.append(good[:pos] + bytes([rng.randrange(256)]) + good[pos + 1:])
        else:
            cases.append(good[:pos] + good[pos + 1:])
    path = tmp_path / "p.txt"
    for data in cases:
        path.write_bytes(data)
        try:
            expected = pf.parse(data)
        except TallyError:
            expected = None
        err, out = reader(path, [p.key for p in GOOD])
        if expected is None:
            assert err.startswith("tally: warning: profile file ") and err.count("\n") == 1, (data, err)
            assert out == ["none"] * len(GOOD), data
        else:
            assert err == "", (data, err)
            want = [f"{expected[p.key].est_ns} {expected[p.key].samples}" if p.key in expected else "none"
                    for p in GOOD]
            assert out == want, data
