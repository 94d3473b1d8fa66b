"""tally's configuration files (TOML): defaults for `tally up` and `tally run`,
and who may run high-priority work.

Two files, both optional, read in this order:

* the system file, `/etc/tally/config.toml` (`$TALLY_SYSTEM_CONFIG` overrides
  the path; tests point it elsewhere);
* the user file, `$TALLY_CONFIG`, else `$XDG_CONFIG_HOME/tally/config.toml`,
  else `~/.config/tally/config.toml`.

Schema (every key optional; docs/operations.md has the reference)::

    [policy]
    policy = "tally"            # tally | passthrough | tgs
    idle_window_us = 100.0      # >= 0
    budget_us = 100.0           # >= 0
    unthrottle_ms = 100.0       # >= 0
    daemon_timeout_ms = 500.0   # > 0

    [daemon]
    metrics_port = 9478         # 0..65535, 0 = off
    mps = true
    gpus = "0,1"                # as `tally up --gpus`
    log_format = "text"         # or "json" (`tally up --log-format`)

    [access]
    high_priority_users = ["alice"]
    high_priority_groups = ["inference"]
    group = "tally"             # share the daemon's files with this group (0750/0660)

    [client]
    memory_limit = "8G"         # default of `tally run --memory-limit`

    [slo]                       # SLO mode's controller (docs/operations.md, "SLO mode")
    interval_ms = 100.0         # > 0: how often it acts
    window_ms = 1000.0          # > 0: p99 over at most this much history
    min_samples = 10            # >= 1: latencies needed to judge a client
    margin = 0.9                # 0 < m <= 1: p99 below margin x SLO leaves room to increase
    increase_us = 100.0         # >= 0: additive increase of the BE budget per interval
    decrease = 0.5              # 0 < d < 1: multiplicative decrease on a violation
    min_budget_us = 10.0        # > 0
    max_budget_us = 20000.0     # >= min_budget_us
    quantile = 0.99             # 0 < q < 1

The user file's `[policy]`, `[daemon]`, `[client]` and `[slo]` values override the
system file's (they are defaults, and the CLI overrides both). `[access]` may
only tighten: a user file's high-priority lists restrict further (both files'
rules must allow a user), and it may turn group sharing off (`group = ""`) but
not choose another group.

Every problem is a TallyError of one line that names the file and the key.
"""
from __future__ import annotations

import grp
import math
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path

from tally.errors import TallyError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SYSTEM_CONFIG = Path("/etc/tally/config.toml")

# Policy names accepted in the file; `tally up` says which of them this build runs.
POLICIES = ("tally", "passthrough", "tgs")
MAX_US = 1e9  # 1000 s: anything larger is a typo, not a setting
MAX_MS = 1e7


@dataclass(frozen=True)
class Key:
    kind: str  # number | int | bool | str | str_list | size
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] | None = None


SCHEMA: dict[str, dict[str, Key]] = {
    "policy": {
        "policy": Key("str", choices=POLICIES),
        "idle_window_us": Key("number", 0, MAX_US),
        "budget_us": Key("number", 0, MAX_US),
        "unthrottle_ms": Key("number", 0, MAX_MS),
        "daemon_timeout_ms": Key("number", 0, MAX_MS, exclusive_minimum=True),
    },
    "daemon": {
        "metrics_port": Key("int", 0, 65535),
        "mps": Key("bool"),
        "gpus": Key("str"),
        "log_format": Key("str", choices=("text", "json")),
    },
    "access": {
        "high_priority_users": Key("str_list"),
        "high_priority_groups": Key("str_list"),
        "group": Key("str"),
    },
    "client": {
        "memory_limit": Key("size"),
    },
    "slo": {
        "interval_ms": Key("number", 0, MAX_MS, exclusive_minimum=True),
        "window_ms": Key("number", 0, MAX_MS, exclusive_minimum=True),
        "min_samples": Key("int", 1, 1_000_000),
        "margin": Key("number", 0, 1, exclusive_minimum=True),
        "increase_us": Key("number", 0, MAX_US),
        "decrease": Key("number", 0, 0.999, exclusive_minimum=True),
        "min_budget_us": Key("number", 0, MAX_US, exclusive_minimum=True),
        "max_budget_us": Key("number", 0, MAX_US, exclusive_minimum=True),
        "quantile": Key("number", 0, 0.9999, exclusive_minimum=True),
    },
}

# tally.daemon.slo.SloParams field for each [slo] key, and the factor from the key's unit
SLO_PARAMS = {
    "interval_ms": ("interval_ns", 1e6), "window_ms": ("window_ns", 1e6), "min_samples": ("min_samples", None),
    "margin": ("margin", None), "increase_us": ("increase_ns", 1e3), "decrease": ("decrease", None),
    "min_budget_us": ("min_budget_ns", 1e3), "max_budget_us": ("max_budget_ns", 1e3), "quantile": ("quantile", None),
}

# `tally up` option name for each [policy]/[daemon] key
UP_OPTIONS = {
    ("policy", "policy"): "policy",
    ("policy", "idle_window_us"): "idle_window_us",
    ("policy", "budget_us"): "budget_us",
    ("policy", "unthrottle_ms"): "unthrottle_ms",
    ("policy", "daemon_timeout_ms"): "daemon_timeout_ms",
    ("daemon", "metrics_port"): "metrics_port",
    ("daemon", "mps"): "mps",
    ("daemon", "gpus"): "gpus",
    ("daemon", "log_format"): "log_format",
}


@dataclass(frozen=True)
class AccessRule:
    """One file's high-priority rule; None for a list the file does not set."""

    source: str
    users: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None

    @property
    def restricts(self) -> bool:
        return self.users is not None or self.groups is not None

    def allows(self, user: str, uid: int, groups: dict[int, str]) -> bool:
        if not self.restricts:
            return True
        if user in (self.users or ()) or str(uid) in (self.users or ()):
            return True
        names = set(groups.values()) | {str(g) for g in groups}
        return bool(names & set(self.groups or ()))


@dataclass
class Config:
    """The merged configuration. `values[(section, key)]` holds what the
    files set (user over system), `origin` the file each value came from."""

    values: dict[tuple[str, str], object] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)
    rules: list[AccessRule] = field(default_factory=list)
    group: str | None = None
    group_origin: str | None = None
    files: list[str] = field(default_factory=list)

    def get(self, section: str, key: str, default=None):
        return self.values.get((section, key), default)

    def up_defaults(self) -> dict:
        """`tally up` options the files set, by option name."""
        return {option: self.values[k] for k, option in UP_OPTIONS.items() if k in self.values}

    @property
    def memory_limit(self) -> str | None:
        return self.get("client", "memory_limit")

    def slo_params(self) -> dict:
        """[slo] as tally.daemon.slo.SloParams overrides (nanoseconds); a budget range that is
        empty is a one-line error naming the file(s)."""
        out = {}
        for key, (name, scale) in SLO_PARAMS.items():
            if ("slo", key) in self.values:
                value = self.values[("slo", key)]
                out[name] = int(round(value * scale)) if scale else value
        low, high = self.values.get(("slo", "min_budget_us")), self.values.get(("slo", "max_budget_us"))
        if low is not None and high is not None and low > high:
            where = sorted({self.origin[("slo", "min_budget_us")], self.origin[("slo", "max_budget_us")]})
            raise TallyError(f"{' and '.join(where)}: slo.min_budget_us ({low:g}) is larger than "
                             f"slo.max_budget_us ({high:g})")
        return out

    @property
    def restricts_high_priority(self) -> bool:
        return any(rule.restricts for rule in self.rules)

    def _identity(self, uid: int | None, gids: list[int] | None) -> tuple[int, str, dict[int, str]]:
        uid = os.getuid() if uid is None else uid
        if gids is None:
            gids = sorted({os.getgid(), *os.getgroups()}) if uid == os.getuid() else _gids_of_uid(uid)
        return uid, user_name(uid), {g: group_name(g) for g in gids}

    def denying_rule(self, uid: int | None = None, gids: list[int] | None = None) -> AccessRule | None:
        """The first rule that does not let this user (default: the current
        one) run high priority, or None when all do."""
        uid, user, groups = self._identity(uid, gids)
        return next((rule for rule in self.rules if not rule.allows(user, uid, groups)), None)

    def may_run_high(self, uid: int | None = None, gids: list[int] | None = None) -> bool:
        return self.denying_rule(uid, gids) is None

    def check_high_priority(self, uid: int | None = None, gids: list[int] | None = None) -> None:
        """Raises a one-line TallyError unless the user may run high priority."""
        denying = self.denying_rule(uid, gids)
        if denying is None:
            return
        allowed = []
        if denying.users:
            allowed.append(f"users {', '.join(denying.users)}")
        if denying.groups:
            allowed.append(f"groups {', '.join(denying.groups)}")
        who = user_name(os.getuid() if uid is None else uid)
        raise TallyError(f"user {who} may not run high priority: {denying.source} [access] allows only "
                         f"{' and '.join(allowed) or 'nobody'}; run with --priority best-effort, "
                         "or ask an administrator")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _gids_of_uid(uid: int) -> list[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return []
    try:
        return sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    except OSError:
        return [entry.pw_gid]


def process_ids(pid: int) -> tuple[int, list[int]] | None:
    """(real uid, all gids) of a live process from /proc/<pid>/status, or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    uid = None
    gids: set[int] = set()
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        try:
            if name == "Uid" and fields:
                uid = int(fields[0])
            elif name == "Gid" and fields:
                gids.add(int(fields[0]))
            elif name == "Groups":
                gids.update(int(f) for f in fields)
        except ValueError:
            return None
    return (uid, sorted(gids)) if uid is not None else None


# ---------------------------------------------------------------------------
# Paths


def system_config_path() -> Path:
    explicit = os.environ.get("TALLY_SYSTEM_CONFIG")
    return Path(explicit) if explicit else SYSTEM_CONFIG


def user_config_path() -> tuple[Path, bool]:
    """(path, whether the user named it explicitly with $TALLY_CONFIG)."""
    explicit = os.environ.get("TALLY_CONFIG")
    if explicit:
        return Path(explicit), True
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "tally" / "config.toml", False


# ---------------------------------------------------------------------------
# Parsing and validation

_TOML_WHERE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def parse_text(text: str, source: str) -> dict[tuple[str, str], object]:
    """Parses and validates one file's text; returns {(section, key): value}."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "invalid TOML"
        where = _TOML_WHERE.search(message)
        if where:
            line = where.group(1)
            message = message[:where.start()]
        else:
            line = str(text.count("\n") + 1)
            message = _TOML_END.sub("", message)
        raise TallyError(f"{source}: line {line}: {message}") from None
    except (ValueError, RecursionError) as exc:  # e.g. deeply nested junk
        raise TallyError(f"{source}: not a valid TOML file ({type(exc).__name__})") from None
    values: dict[tuple[str, str], object] = {}
    for section, body in raw.items():
        if section not in SCHEMA and not isinstance(body, dict):
            raise TallyError(f"{source}: unknown key {_show_key(section)} (keys belong in a section: "
                             f"{', '.join(f'[{s}]' for s in SCHEMA)})")
        if section not in SCHEMA:
            raise TallyError(f"{source}: unknown section [{_show_key(section)}] "
                             f"(known: {', '.join(f'[{s}]' for s in SCHEMA)})")
        if not isinstance(body, dict):
            raise TallyError(f"{source}: {_show_key(section)} must be a table ([{section}]), "
                             f"not {_type_name(body)}")
        for key, value in body.items():
            spec = SCHEMA[section].get(key)
            if spec is None:
                raise TallyError(f"{source}: unknown key {section}.{_show_key(key)} "
                                 f"(known in [{section}]: {', '.join(SCHEMA[section])})")
            values[(section, key)] = _check_value(value, spec, f"{source}: {section}.{key}")
    return values


def _show_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else repr(key[:64])


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_value(value, spec: Key, where: str):
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise TallyError(f"{where} must be true or false, not {_type_name(value)} {_show(value)}")
        return value
    if spec.kind in ("number", "int"):
        ok = isinstance(value, int) if spec.kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            wanted = "an integer" if spec.kind == "int" else "a number"
            raise TallyError(f"{where} must be {wanted}, not {_type_name(value)} {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise TallyError(f"{where} must be finite, not {value}")
        low, high = spec.minimum, spec.maximum
        if low is not None and (value <= low if spec.exclusive_minimum else value < low):
            raise TallyError(f"{where} must be {'>' if spec.exclusive_minimum else '>='} {low:g}, not {value}")
        if high is not None and value > high:
            raise TallyError(f"{where} must be <= {high:g}, not {value}")
        return float(value) if spec.kind == "number" else value
    if spec.kind == "str":
        if not isinstance(value, str):
            raise TallyError(f"{where} must be a string, not {_type_name(value)} {_show(value)}")
        if spec.choices is not None and value not in spec.choices:
            raise TallyError(f"{where} must be one of {', '.join(spec.choices)}, not {_show(value)}")
        if "\n" in value or "\0" in value:
            raise TallyError(f"{where} must be one line")
        return value
    if spec.kind == "str_list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TallyError(f"{where} must be an array of strings, e.g. [\"alice\"], not {_show(value)}")
        for v in value:
            if not v or any(c.isspace() or c in ":,\0" for c in v):
                raise TallyError(f"{where} has an invalid name {_show(v)}")
        return tuple(value)
    if spec.kind == "size":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TallyError(f"{where} must be a size such as \"8G\", not {_type_name(value)} {_show(value)}")
        try:
            parse_memory_limit(str(value))
        except TallyError as exc:
            raise TallyError(f"{where}: {exc}") from None
        return str(value)
    raise AssertionError(spec.kind)  # pragma: no cover


def read_file(path: Path) -> dict[tuple[str, str], object]:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise TallyError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise TallyError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TallyError(f"{path}: line {line}: not UTF-8 text") from None
    return parse_text(text, str(path))


def merge(system: dict | None, user: dict | None, system_source: str = "system config",
          user_source: str = "user config") -> Config:
    """The merged Config of a system file's and a user file's parsed values."""
    config = Config()
    for values, source in ((system, system_source), (user, user_source)):
        if values is None:
            continue
        config.files.append(source)
        for key, value in values.items():
            if key[0] == "access":
                continue
            config.values[key] = value
            config.origin[key] = source
        rule = AccessRule(source, values.get(("access", "high_priority_users")),
                          values.get(("access", "high_priority_groups")))
        if rule.restricts:
            config.rules.append(rule)
    system_group = (system or {}).get(("access", "group")) or None
    config.group, config.group_origin = system_group, (system_source if system_group else None)
    if user and ("access", "group") in user:
        wanted = user[("access", "group")]
        if wanted == "":
            config.group, config.group_origin = None, user_source
        elif wanted != system_group:
            raise TallyError(f"{user_source}: access.group {wanted!r} is not allowed: only the system config "
                             f"({system_source}) may share tally's files with a group; a user config may only "
                             "turn sharing off (group = \"\")")
    return config


def load() -> Config:
    """The configuration of this user: system file, then user file."""
    system_path = system_config_path()
    user_path, explicit = user_config_path()
    system = read_file(system_path) if system_path.exists() else None
    if user_path.exists() or explicit:
        if not user_path.exists():
            raise TallyError(f"{user_path}: config file not found (TALLY_CONFIG names it)")
        user = read_file(user_path)
    else:
        user = None
    return merge(system, user, str(system_path), str(user_path))


# ---------------------------------------------------------------------------
# Memory limits (MPS's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
MIN_LIMIT = 1 << 20
MAX_LIMIT = 1 << 50


def parse_size(text: str) -> int:
    """Bytes of a size such as "8G", "512M", "1.5GiB", "1073741824" (binary units)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise TallyError(f"memory limit {text.strip()[:40]!r} is not a size such as 8G, 512M or 1.5GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < MIN_LIMIT:
        raise TallyError(f"memory limit {text.strip()!r} is below 1M")
    if value > MAX_LIMIT:
        raise TallyError(f"memory limit {text.strip()[:40]!r} is larger than any GPU")
    return value


def format_size(nbytes: int) -> str:
    """MPS's syntax: whole GiB as "8G", else whole MiB as "1536M"."""
    if nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30}G"
    return f"{nbytes >> 20}M"


def parse_memory_limit(spec: str) -> dict[int | None, int]:
    """{device ordinal: bytes} of "8G" (key None: every device the client
    sees) or "0=8G,1=4G" (per device ordinal, as CUDA enumerates them for
    the client)."""
    spec = spec.strip()
    if not spec:
        raise TallyError("memory limit is empty: give a size such as 8G, or 0=8G,1=4G")
    if "=" not in spec:
        return {None: parse_size(spec)}
    limits: dict[int | None, int] = {}
    for part in spec.split(","):
        device, sep, size = part.partition("=")
        device = device.strip()
        if not sep or not device.isdigit() or len(device) > 4:
            raise TallyError(f"memory limit entry {part.strip()[:40]!r} is not DEVICE=SIZE "
                             "(a CUDA device ordinal, e.g. 0=8G)")
        ordinal = int(device)
        if ordinal in limits:
            raise TallyError(f"memory limit names device {ordinal} twice")
        limits[ordinal] = parse_size(size)
    return limits


def mps_memory_limit(spec: str, device_count: int) -> str:
    """The value of CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for a client that sees
    `device_count` devices: "0=8G,1=8G". Device ordinals, not UUIDs: limits
    given per UUID have been reported not to apply."""
    limits = parse_memory_limit(spec)
    if None in limits:
        if device_count < 1:
            raise TallyError("memory limit: the client sees no GPU")
        limits = {i: limits[None] for i in range(device_count)}
    beyond = [d for d in limits if d >= max(device_count, 1)]
    if beyond:
        raise TallyError(f"memory limit names device {beyond[0]}, but the client sees "
                         f"{device_count} device(s) (0..{device_count - 1})")
    return ",".join(f"{d}={format_size(limits[d])}" for d in sorted(limits))
