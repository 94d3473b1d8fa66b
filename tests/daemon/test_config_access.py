"""The config files wired into `tally up` / `tally run` / `tally status`, and
access control: file modes, group sharing, who may run high priority, memory
limits, version skew. Real processes (a detached daemon, fake GPUs, no MPS)."""
import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from daemon_helpers import Env, one_line_error
from tally import scoreboard as sb

UP = ("up", "--no-mps", "--metrics-port", "0")
ROOT = os.getuid() == 0


@pytest.fixture
def cfg_env(tally_env, tmp_path, monkeypatch):
    """tally_env plus private config paths; returns (env, system file, user file)."""
    system = tmp_path / "etc" / "config.toml"
    user = tmp_path / "xdg" / "tally" / "config.toml"
    system.parent.mkdir(parents=True)
    user.parent.mkdir(parents=True)
    monkeypatch.setenv("TALLY_SYSTEM_CONFIG", str(system))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TALLY_CONFIG", raising=False)
    yield tally_env, system, user
    tally_env.tally("down", "--force")


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_default_files_are_private(cfg_env):
    env, _, _ = cfg_env
    assert env.tally(*UP).returncode == 0
    state = env.state()
    assert _mode(env.runtime) == 0o700
    assert _mode(env.runtime / "state.json") == 0o600
    assert _mode(env.runtime / "daemon.pid") == 0o600
    assert _mode(env.runtime / "daemon.log") == 0o600
    for gpu in state["gpus"]:
        assert _mode(gpu["scoreboard"]) == 0o600
    assert state["tally_version"] and state["layout_version"] == sb.VERSION


def test_up_takes_defaults_from_config_and_flags_override(cfg_env):
    env, system, user = cfg_env
    system.write_text("[policy]\nbudget_us = 40\nidle_window_us = 7\n[daemon]\nmetrics_port = 0\nmps = false\n")
    user.write_text("[policy]\nbudget_us = 31.6\nunthrottle_ms = 250\n")
    up = env.tally("up", "--idle-window-us", "12")
    assert up.returncode == 0, up.stderr
    params = env.state()["params"]
    assert params["turnaround_budget_ns"] == 31_600  # user file over system file
    assert params["idle_window_ns"] == 12_000  # flag over both
    assert params["unthrottle_after_ns"] == 250_000_000
    assert env.state()["mps"] is None and env.state()["metrics"] is None


def test_bad_config_stops_up_with_one_line(cfg_env):
    env, system, _ = cfg_env
    system.write_text("[policy]\nbudget_us = 100\nbudget_us = 5\n")
    line = one_line_error(env.tally(*UP))
    assert line.startswith(f"tally: error: {system}: line 3: ")
    system.write_text("[policy]\nbudget_us = -3\n")
    assert f"{system}: policy.budget_us must be >= 0, not -3" in one_line_error(env.tally(*UP))
    assert env.state() is None and not (env.runtime / "daemon.pid").exists()  # nothing half-made


def test_run_high_priority_checks_access_rules(cfg_env):
    env, system, user = cfg_env
    assert env.tally(*UP).returncode == 0
    me = pwd.getpwuid(os.getuid()).pw_name
    system.write_text("[access]\nhigh_priority_users = [\"somebody-else\"]\n")
    denied = one_line_error(env.tally("run", "--priority", "high", "--", "true"))
    assert f"user {me} may not run high priority: {system} [access] allows only users somebody-else" in denied
    ok = env.tally("run", "--priority", "best-effort", "--", "true")
    assert ok.returncode == 0, ok.stderr
    # a user file cannot widen the system's rule...
    user.write_text(f"[access]\nhigh_priority_users = [\"{me}\"]\n")
    assert "may not run high priority" in one_line_error(env.tally("run", "--priority", "high", "--", "true"))
    # ...but can narrow an open one
    system.write_text(f"[access]\nhigh_priority_users = [\"{me}\"]\n")
    user.write_text("")
    assert env.tally("run", "--priority", "high", "--", "true").returncode == 0
    user.write_text("[access]\nhigh_priority_users = [\"x\"]\n")
    assert "may not run high priority" in one_line_error(env.tally("run", "--priority", "high", "--", "true"))
    # a group of mine
    user.write_text("")
    system.write_text(f"[access]\nhigh_priority_groups = [\"{grp.getgrgid(os.getgid()).gr_name}\"]\n")
    assert env.tally("run", "--priority", "high", "--", "true").returncode == 0


def test_denied_user_does_not_auto_start_a_daemon(cfg_env):
    env, system, _ = cfg_env
    system.write_text("[access]\nhigh_priority_users = []\n")
    assert "may not run high priority" in one_line_error(
        env.tally("run", "--priority", "high", "--auto-up", "--", "true"))
    assert env.state() is None


def _fake_external_mps(tmp_path) -> Path:
    """A directory `tally up --mps-pipe-dir` accepts (it checks for the control pipe)."""
    pipe = tmp_path / "ext-mps"
    pipe.mkdir()
    (pipe / "control").touch()
    return pipe


def _env_of(result) -> dict:
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_memory_limit_sets_mps_variable(cfg_env, tmp_path):
    env, system, _ = cfg_env
    pipe = _fake_external_mps(tmp_path)
    assert env.tally("up", "--mps-pipe-dir", str(pipe), "--metrics-port", "0").returncode == 0
    run = env.tally("run", "--priority", "high", "--memory-limit", "8G", "--", "env")
    assert run.returncode == 0, run.stderr
    assert _env_of(run)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8G,1=8G"  # two fake GPUs
    assert _env_of(run)["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
    one = env.tally("run", "--priority", "high", "--memory-limit", "1.5G", "--", "env",
                    env={"CUDA_VISIBLE_DEVICES": "0"})
    assert _env_of(one)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=1536M"
    # the config's default
    system.write_text("[client]\nmemory_limit = \"0=4G\"\n")
    default = env.tally("run", "--priority", "high", "--", "env")
    assert _env_of(default)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4G"
    # the user's own setting wins over the config's default, the flag over both
    own = env.tally("run", "--priority", "high", "--", "env", env={"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2G"})
    assert _env_of(own)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2G"
    flag = env.tally("run", "--priority", "high", "--memory-limit", "1=1G", "--", "env")
    assert _env_of(flag)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "1=1G"
    for bad, message in (("8Q", "is not a size"), ("5=1G", "names device 5, but the client sees 2")):
        assert message in one_line_error(env.tally("run", "--priority", "high", "--memory-limit", bad, "--", "env"))


def test_memory_limit_needs_mps_and_priority(cfg_env):
    env, system, _ = cfg_env
    assert "needs --priority" in one_line_error(env.tally("run", "--memory-limit", "8G", "--", "true"))
    assert env.tally(*UP).returncode == 0
    assert "needs MPS, but the running tally daemon has none" in one_line_error(
        env.tally("run", "--priority", "high", "--memory-limit", "8G", "--", "true"))
    system.write_text("[client]\nmemory_limit = \"8G\"\n")  # a default is not an error: a warning
    run = env.tally("run", "--priority", "high", "--", "env")
    assert run.returncode == 0 and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in _env_of(run)
    assert "memory_limit 8G is not applied" in run.stderr


def _rewrite_state(env: Env, **changes):
    path = env.runtime / "state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def test_version_skew_is_reported(cfg_env):
    env, _, _ = cfg_env
    assert env.tally(*UP).returncode == 0
    _rewrite_state(env, tally_version="0.0.1")
    status = env.tally("status", "--json")
    assert status.returncode == 0
    assert "running tally daemon" in status.stderr and "is tally 0.0.1, this is tally" in status.stderr
    run = env.tally("run", "--priority", "best-effort", "--", "true")
    assert run.returncode == 0 and "is tally 0.0.1" in run.stderr and "tally down" in run.stderr
    _rewrite_state(env, layout_version=sb.VERSION + 1)
    line = one_line_error(env.tally("run", "--priority", "high", "--", "true"))
    assert f"with scoreboard layout {sb.VERSION + 1}, but this is tally" in line
    _rewrite_state(env, tally_version=None, layout_version=None)  # a daemon too old to say
    assert "(unknown version)" in env.tally("run", "--priority", "high", "--", "true").stderr


# ---------------------------------------------------------------------------
# Other users: needs root to run a process as `nobody`

needs_root = pytest.mark.skipif(not ROOT, reason="needs root to run processes as another user")


@pytest.fixture
def shared_env(cfg_env, monkeypatch):
    """Runtime and shm dirs another user can reach (tmp_path's parents are 0700)."""
    env, system, user = cfg_env
    base = Path(tempfile.mkdtemp(prefix="tally-access-"))
    os.chmod(base, 0o755)
    (base / "shm").mkdir(mode=0o755)
    os.chmod(base / "shm", 0o755)
    monkeypatch.setenv("TALLY_RUNTIME_DIR", str(base / "run"))
    monkeypatch.setenv("TALLY_SHM_DIR", str(base / "shm"))
    env.runtime, env.shm = base / "run", base / "shm"
    yield env, system, user
    env.tally("down", "--force")
    shutil.rmtree(base, ignore_errors=True)


def _nobody():
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _share_group() -> grp.struct_group:
    """A group that exists here and that `nobody` is not in."""
    for name in ("daemon", "adm", "users", "bin"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.skip("no spare group")


def _open_as(uid, gid, path, extra_groups=(), mode="<>"):
    """Whether `uid` can open `path` for reading and writing ("<>") or reading ("<"); a shell, not
    this venv's python, which another user may not be able to reach."""
    script = f'( exec 3{mode}"$1" ) 2>/dev/null && echo ok || echo denied'
    result = subprocess.run(["/bin/sh", "-c", script, "sh", str(path)], capture_output=True, text=True,
                            user=uid, group=gid, extra_groups=list(extra_groups), cwd="/", timeout=30)
    return result.stdout.strip() or result.stderr


@needs_root
def test_other_users_cannot_open_scoreboards(shared_env):
    env, _, _ = shared_env
    assert env.tally(*UP).returncode == 0
    uid, gid = _nobody()
    for gpu in env.state()["gpus"]:
        assert _open_as(uid, gid, gpu["scoreboard"]) == "denied"
    assert _open_as(uid, gid, env.runtime / "state.json") == "denied"


@needs_root
def test_group_sharing_modes_and_access(shared_env):
    env, system, _ = shared_env
    group = _share_group()
    system.write_text(f"[access]\ngroup = \"{group.gr_name}\"\n")
    up = env.tally(*UP)
    assert up.returncode == 0, up.stderr
    state = env.state()
    assert _mode(env.runtime) == 0o750 and os.stat(env.runtime).st_gid == group.gr_gid
    for name in ("state.json", "daemon.pid"):
        assert _mode(env.runtime / name) == 0o640 and os.stat(env.runtime / name).st_gid == group.gr_gid
    assert _mode(env.runtime / "daemon.log") == 0o600
    uid, gid = _nobody()
    for gpu in state["gpus"]:
        assert _mode(gpu["scoreboard"]) == 0o660 and os.stat(gpu["scoreboard"]).st_gid == group.gr_gid
        assert _open_as(uid, gid, gpu["scoreboard"]) == "denied"  # not in the group
        assert _open_as(uid, gid, gpu["scoreboard"], [group.gr_gid]) == "ok"  # in the group
    # a group member can reach the runtime dir and read what `tally run` reads; the log stays private
    for name in ("state.json", "daemon.pid"):
        assert _open_as(uid, gid, env.runtime / name, [group.gr_gid], mode="<") == "ok"
        assert _open_as(uid, gid, env.runtime / name, [group.gr_gid]) == "denied"  # but not write them
    assert _open_as(uid, gid, env.runtime / "daemon.log", [group.gr_gid], mode="<") == "denied"
    assert _open_as(uid, gid, env.runtime / "state.json", mode="<") == "denied"
    # sharing turned off again: `tally up` makes the dir private
    assert env.tally("down").returncode == 0
    system.write_text("")
    assert env.tally(*UP).returncode == 0
    assert _mode(env.runtime) == 0o700 and _mode(env.state()["gpus"][0]["scoreboard"]) == 0o600


def test_unknown_share_group_is_one_line_error(cfg_env):
    env, system, _ = cfg_env
    system.write_text("[access]\ngroup = \"no-such-group-xyz\"\n")
    assert "access.group 'no-such-group-xyz' is not a group on this machine" in one_line_error(env.tally(*UP))


@needs_root
def test_daemon_demotes_high_priority_claims_the_rules_deny(shared_env):
    env, system, _ = shared_env
    me = pwd.getpwuid(os.getuid()).pw_name
    system.write_text(f"[access]\nhigh_priority_users = [\"{me}\"]\n")
    assert env.tally(*UP).returncode == 0
    uid, gid = _nobody()
    other = env.popen(["sleep", "30"], user=uid, group=gid)
    with sb.Scoreboard.open(env.state()["gpus"][0]["scoreboard"]) as board:
        # a process of a user without permission claims high priority by writing its slot directly
        theirs = board.claim_slot(other.pid, sb.PRIORITY_HIGH, comm="sneaky")
        mine = board.claim_slot(os.getpid(), sb.PRIORITY_HIGH, comm="pytest")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and board.slot_get(theirs, "priority") == sb.PRIORITY_HIGH:
            time.sleep(0.01)
        assert board.slot_get(theirs, "priority") == sb.PRIORITY_BEST_EFFORT
        time.sleep(0.1)
        assert board.slot_get(mine, "priority") == sb.PRIORITY_HIGH
        assert board.hp_active == 1 and board.be_active == 1
        board.release_slot(mine)
        board.release_slot(theirs)
    log = (env.runtime / "daemon.log").read_text()
    assert f"pid {other.pid} (user nobody) claimed high priority" in log and "demoted to best-effort" in log
