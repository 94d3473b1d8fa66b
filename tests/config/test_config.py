"""The config files: parsing, validation, merging, access rules, memory limits."""
import grp
import os
import pwd

import pytest

from tally import config as cfgmod
from tally.errors import TallyError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


FULL = """
[policy]
policy = "passthrough"
idle_window_us = 50
budget_us = 31.6
unthrottle_ms = 200.0
daemon_timeout_ms = 250

[daemon]
metrics_port = 0
mps = false
gpus = "0"

[access]
high_priority_users = ["alice", "root"]
high_priority_groups = ["inference"]

[client]
memory_limit = "8G"
"""


def test_no_files_means_defaults_and_everyone_may_run_high():
    cfg = cfgmod.load()
    assert cfg.files == [] and cfg.up_defaults() == {} and cfg.memory_limit is None
    assert cfg.group is None and not cfg.restricts_high_priority
    assert cfg.may_run_high()


def test_full_system_file(isolated_config):
    system, _ = isolated_config
    write(system, FULL)
    cfg = cfgmod.load()
    assert cfg.up_defaults() == {"policy": "passthrough", "idle_window_us": 50.0, "budget_us": 31.6,
                                 "unthrottle_ms": 200.0, "daemon_timeout_ms": 250.0, "metrics_port": 0,
                                 "mps": False, "gpus": "0"}
    assert cfg.memory_limit == "8G"
    assert cfg.origin[("policy", "budget_us")] == str(system)


def test_user_file_overrides_defaults(isolated_config):
    system, user = isolated_config
    write(system, "[policy]\nbudget_us = 100\nidle_window_us = 10\n[client]\nmemory_limit = \"8G\"\n")
    write(user, "[policy]\nbudget_us = 30\n[client]\nmemory_limit = \"4G\"\n")
    cfg = cfgmod.load()
    assert cfg.get("policy", "budget_us") == 30.0 and cfg.get("policy", "idle_window_us") == 10.0
    assert cfg.memory_limit == "4G"
    assert cfg.files == [str(system), str(user)]


def test_tally_config_env_names_the_user_file(tmp_path, monkeypatch):
    path = write(tmp_path / "mine.toml", "[daemon]\nmetrics_port = 9999\n")
    monkeypatch.setenv("TALLY_CONFIG", str(path))
    assert cfgmod.load().up_defaults() == {"metrics_port": 9999}
    monkeypatch.setenv("TALLY_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(TallyError, match="missing.toml: config file not found"):
        cfgmod.load()


@pytest.mark.parametrize("text, message", [
    ("[policy\n", r"/c.toml: line 1: "),
    ("[policy]\nbudget_us = 1\nbudget_us = 2\n", r"/c.toml: line 3: "),
    ("[policy]\nbudget_us = \n", r"/c.toml: line 2: "),
    ("budget_us = 5\n", r"unknown key budget_us \(keys belong in a section"),
    ("[polcy]\n", r"unknown section \[polcy\]"),
    ("[policy]\nbudjet_us = 5\n", r"/c.toml: unknown key policy.budjet_us \(known in \[policy\]: "),
    ("[policy]\nbudget_us = \"100\"\n", r"policy.budget_us must be a number, not a string '100'"),
    ("[policy]\nbudget_us = true\n", r"policy.budget_us must be a number, not a boolean"),
    ("[policy]\nbudget_us = -1\n", r"policy.budget_us must be >= 0, not -1"),
    ("[policy]\nbudget_us = nan\n", r"policy.budget_us must be finite"),
    ("[policy]\nbudget_us = 1e12\n", r"policy.budget_us must be <= 1e\+09"),
    ("[policy]\ndaemon_timeout_ms = 0\n", r"policy.daemon_timeout_ms must be > 0"),
    ("[policy]\npolicy = \"fifo\"\n", r"policy.policy must be one of tally, passthrough, tgs, not 'fifo'"),
    ("[daemon]\nmetrics_port = 70000\n", r"daemon.metrics_port must be <= 65535"),
    ("[daemon]\nmetrics_port = 1.5\n", r"daemon.metrics_port must be an integer, not a number 1.5"),
    ("[daemon]\nmps = \"yes\"\n", r"daemon.mps must be true or false"),
    ("[access]\nhigh_priority_users = \"alice\"\n", r"access.high_priority_users must be an array of strings"),
    ("[access]\nhigh_priority_users = [\"a b\"]\n", r"access.high_priority_users has an invalid name"),
    ("[client]\nmemory_limit = \"8Q\"\n", r"client.memory_limit: memory limit '8Q' is not a size"),
    ("[client]\nmemory_limit = \"0=8G,0=4G\"\n", r"client.memory_limit: memory limit names device 0 twice"),
    ("policy = 3\n", r"unknown key policy|policy must be a table"),
])
def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(TallyError, match=message) as info:
        cfgmod.read_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unreadable_and_binary_files(tmp_path):
    with pytest.raises(TallyError, match="is a directory"):
        cfgmod.read_file(tmp_path)
    path = tmp_path / "bin.toml"
    path.write_bytes(b"[policy]\n\xff\xfe\n")
    with pytest.raises(TallyError, match=r"bin.toml: line 2: not UTF-8"):
        cfgmod.read_file(path)


def _me():
    return pwd.getpwuid(os.getuid()).pw_name


def test_access_rules_users_and_groups():
    me, uid = _me(), os.getuid()
    my_group = grp.getgrgid(os.getgid()).gr_name
    allow_me = cfgmod.merge(cfgmod.parse_text(f"[access]\nhigh_priority_users = [\"{me}\"]\n", "sys"), None)
    assert allow_me.may_run_high()
    by_group = cfgmod.merge(cfgmod.parse_text(f"[access]\nhigh_priority_groups = [\"{my_group}\"]\n", "sys"), None)
    assert by_group.may_run_high()
    assert not by_group.may_run_high(uid=uid, gids=[])  # group membership is what lets you in
    other = cfgmod.merge(cfgmod.parse_text("[access]\nhigh_priority_users = [\"nobody-at-all\"]\n", "sys"), None)
    assert not other.may_run_high()
    with pytest.raises(TallyError) as info:
        other.check_high_priority()
    assert str(info.value).startswith(f"user {me} may not run high priority: system config [access] allows only users "
                                      "nobody-at-all")
    empty = cfgmod.merge(cfgmod.parse_text("[access]\nhigh_priority_users = []\n", "sys"), None)
    assert not empty.may_run_high() and "allows only nobody" in _error(empty.check_high_priority)


def _error(fn):
    with pytest.raises(TallyError) as info:
        fn()
    return str(info.value)


def test_user_file_cannot_grant_itself_high_priority():
    me = _me()
    system = cfgmod.parse_text("[access]\nhigh_priority_users = [\"alice\"]\n", "/etc/tally/config.toml")
    user = cfgmod.parse_text(f"[access]\nhigh_priority_users = [\"{me}\"]\n", "~/.config/tally/config.toml")
    cfg = cfgmod.merge(system, user, "/etc/tally/config.toml", "~/.config/tally/config.toml")
    assert not cfg.may_run_high()
    assert "/etc/tally/config.toml [access]" in _error(cfg.check_high_priority)
    # ... but may tighten: a system file that allows everyone, a user file that allows only alice
    tightened = cfgmod.merge(None, cfgmod.parse_text("[access]\nhigh_priority_users = [\"alice\"]\n", "u"))
    assert not tightened.may_run_high()


def test_user_file_may_turn_group_sharing_off_but_not_choose_a_group():
    system = cfgmod.parse_text("[access]\ngroup = \"daemon\"\n", "sys")
    assert cfgmod.merge(system, None).group == "daemon"
    assert cfgmod.merge(system, cfgmod.parse_text("[access]\ngroup = \"\"\n", "usr")).group is None
    assert cfgmod.merge(system, cfgmod.parse_text("[access]\ngroup = \"daemon\"\n", "usr")).group == "daemon"
    with pytest.raises(TallyError, match=r"usr: access.group 'adm' is not allowed: only the system config"):
        cfgmod.merge(system, cfgmod.parse_text("[access]\ngroup = \"adm\"\n", "usr"), "sys", "usr")
    with pytest.raises(TallyError, match="not allowed"):
        cfgmod.merge(None, cfgmod.parse_text("[access]\ngroup = \"adm\"\n", "usr"))


def test_process_ids_of_this_process():
    uid, gids = cfgmod.process_ids(os.getpid())
    assert uid == os.getuid() and os.getgid() in gids
    assert cfgmod.process_ids(2 ** 22 + 12345) is None


@pytest.mark.parametrize("spec, count, expected", [
    ("8G", 2, "0=8G,1=8G"),
    ("8g", 1, "0=8G"),
    ("8GiB", 1, "0=8G"),
    ("8GB", 1, "0=8G"),
    ("1.5G", 1, "0=1536M"),
    ("512M", 1, "0=512M"),
    ("1073741824", 1, "0=1G"),
    (" 0=8G, 1=512MB ", 2, "0=8G,1=512M"),
    ("1=4G", 2, "1=4G"),
])
def test_memory_limits_in_mps_syntax(spec, count, expected):
    assert cfgmod.mps_memory_limit(spec, count) == expected


@pytest.mark.parametrize("spec, count, message", [
    ("", 1, "memory limit is empty"),
    ("8Q", 1, "is not a size"),
    ("-8G", 1, "is not a size"),
    ("0.5M", 1, "below 1M"),
    ("0", 1, "below 1M"),
    ("9999999T", 1, "larger than any GPU"),
    ("GPU-abcd=8G", 1, "is not DEVICE=SIZE"),
    ("0=8G,0=8G", 1, "names device 0 twice"),
    ("3=8G", 2, "names device 3, but the client sees 2 device"),
    ("8G", 0, "sees no GPU"),
])
def test_bad_memory_limits(spec, count, message):
    with pytest.raises(TallyError, match=message):
        cfgmod.mps_memory_limit(spec, count)


def test_slo_section_sets_the_controller(isolated_config):
    from tally.daemon.slo import SloParams

    system, user = isolated_config
    write(system, "[slo]\nincrease_us = 50\nmin_budget_us = 20\nmax_budget_us = 5000\nmargin = 0.8\n")
    write(user, "[slo]\ninterval_ms = 50\nmin_samples = 20\n")
    params = cfgmod.load().slo_params()
    assert params == {"interval_ns": 50_000_000, "min_samples": 20, "margin": 0.8, "increase_ns": 50_000,
                      "min_budget_ns": 20_000, "max_budget_ns": 5_000_000}
    assert SloParams(**params).increase_ns == 50_000  # exactly the daemon's parameter names


@pytest.mark.parametrize("text,message", [
    ("[slo]\nmargin = 1.5\n", "slo.margin"),
    ("[slo]\ndecrease = 0\n", "slo.decrease"),
    ("[slo]\nmin_samples = 2.5\n", "slo.min_samples"),
    ("[slo]\nwindow = 3\n", "unknown key slo.window"),
])
def test_bad_slo_values_are_one_line_errors(isolated_config, text, message):
    system, _ = isolated_config
    write(system, text)
    with pytest.raises(TallyError) as exc:
        cfgmod.load()
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_an_empty_slo_budget_range_is_an_error_naming_both_files(isolated_config):
    system, user = isolated_config
    write(system, "[slo]\nmax_budget_us = 100\n")
    write(user, "[slo]\nmin_budget_us = 500\n")
    with pytest.raises(TallyError) as exc:
        cfgmod.load().slo_params()
    assert str(system) in str(exc.value) and str(user) in str(exc.value) and "larger than" in str(exc.value)


def test_tally_up_passes_the_slo_section_to_the_daemon(isolated_config):
    from tally.daemon.control import options_from_config

    system, _ = isolated_config
    write(system, "[slo]\nincrease_us = 25\n")
    assert options_from_config().slo == {"increase_ns": 25_000}
