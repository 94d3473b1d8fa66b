"""Property-based tests (hypothesis) of the parsers that take user files: the
config file, `tally trace` JSON lines, the Azure CSV trace and arrivals files.
Valid input round-trips; junk never raises anything but TallyError."""
import json
import math
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally import config as cfgmod
from tally.errors import TallyError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=12)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
sizes = st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 4096), st.sampled_from(["M", "G", "MiB", "GB", "g"]))
per_device = st.dictionaries(st.integers(0, 7), sizes, min_size=1, max_size=4).map(
    lambda d: ",".join(f"{k}={v}" for k, v in d.items()))

VALUES = {
    ("policy", "policy"): st.sampled_from(cfgmod.POLICIES),
    ("policy", "idle_window_us"): finite,
    ("policy", "budget_us"): st.one_of(finite, st.integers(0, 10**6)),
    ("policy", "unthrottle_ms"): finite,
    ("policy", "daemon_timeout_ms"): st.floats(min_value=0.001, max_value=1e6),
    ("daemon", "metrics_port"): st.integers(0, 65535),
    ("daemon", "mps"): st.booleans(),
    ("daemon", "gpus"): st.text(alphabet=string.digits + ",GPU-abcdef", max_size=20),
    ("access", "high_priority_users"): st.lists(names, max_size=4),
    ("access", "high_priority_groups"): st.lists(names, max_size=4),
    ("access", "group"): names,
    ("client", "memory_limit"): st.one_of(sizes, per_device),
    ("slo", "interval_ms"): st.floats(min_value=0.001, max_value=1e6),
    ("slo", "min_samples"): st.integers(1, 1000),
    ("slo", "margin"): st.floats(min_value=0.01, max_value=1.0),
    ("slo", "decrease"): st.floats(min_value=0.01, max_value=0.99),
    ("slo", "increase_us"): finite,
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of these characters is a TOML basic string
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def to_toml(values: dict) -> str:
    sections: dict[str, list[str]] = {}
    for (section, key), value in values.items():
        sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
    return "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items())


@st.composite
def configs(draw):
    keys = draw(st.sets(st.sampled_from(sorted(VALUES)), max_size=len(VALUES)))
    return {key: draw(VALUES[key]) for key in sorted(keys)}


@SETTINGS
@given(configs())
def test_valid_configs_round_trip(values):
    parsed = cfgmod.parse_text(to_toml(values), "/etc/tally/config.toml")
    expected = {}
    for key, value in values.items():
        kind = cfgmod.SCHEMA[key[0]][key[1]].kind
        expected[key] = (float(value) if kind == "number" else tuple(value) if kind == "str_list" else value)
    assert parsed == expected
    merged = cfgmod.merge(parsed, None)
    for (section, key), option in cfgmod.UP_OPTIONS.items():
        if (section, key) in expected:
            assert merged.up_defaults()[option] == expected[(section, key)]


def _only_tally_errors(fn, *args):
    try:
        fn(*args)
    except TallyError as exc:
        assert "\n" not in str(exc)


toml_like = st.text(alphabet=string.printable + "éλ\0\u2028", max_size=200)
toml_fragments = st.lists(st.sampled_from([
    "[policy]", "[daemon]", "[access]", "[client]", "[[policy]]", "[policy.x]", "budget_us = ", "= 1", "1e400",
    "nan", "inf", "-5", "\"8G\"", "[\"a\"]", "{a = 1}", "true", "memory_limit", "group", "\n", " ", "\"", "'",
    "#", "0x10", "1979-05-27", "high_priority_users", "metrics_port", "policy", "=", ".", ",", "]", "[",
]), max_size=30).map("".join)


@SETTINGS
@given(st.one_of(toml_like, toml_fragments))
def test_junk_config_text_raises_only_tally_errors(text):
    _only_tally_errors(cfgmod.parse_text, text, "/c.toml")


@SETTINGS
@given(st.binary(max_size=200))
def test_junk_config_bytes_raise_only_tally_errors(tmp_path, data):
    path = tmp_path / "junk.toml"
    path.write_bytes(data)
    _only_tally_errors(cfgmod.read_file, path)


@SETTINGS
@given(st.text(max_size=60))
def test_junk_memory_limits_raise_only_tally_errors(text):
    try:
        value = cfgmod.mps_memory_limit(text, 2)
    except TallyError as exc:
        assert "\n" not in str(exc)
    else:
        for part in value.split(","):
            device, size = part.split("=")
            assert device in ("0", "1") and size[-1] in "MG" and int(size[:-1]) >= 1


# ---------------------------------------------------------------------------
# Trace parsers

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=10))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
kernel_keys = st.sampled_from(["type", "name", "start", "end", "grid", "block", "shared", "stream", "kernel",
                               "graph", "pid"])
records = st.one_of(json_values, st.dictionaries(kernel_keys, json_values, max_size=8))


@SETTINGS
@given(st.lists(st.one_of(records.map(json.dumps), st.text(max_size=30)), max_size=8))
def test_junk_tally_traces_raise_only_tally_errors(tmp_path, lines):
    from tally import trace

    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines))

    def read_and_summarize():
        summary = trace.summarize(trace.read_trace(path))
        trace.summary_json(summary, 10)

    _only_tally_errors(read_and_summarize)


csv_cells = st.one_of(st.text(alphabet=string.printable, max_size=8),
                      st.floats(allow_nan=True).map(str), st.integers(-10**6, 10**6).map(str))


@SETTINGS
@given(st.one_of(
    st.text(max_size=200),
    st.lists(st.lists(csv_cells, max_size=6), max_size=6).map(
        lambda rows: "app,func,end_timestamp,duration\n" + "\n".join(",".join(r) for r in rows)),
))
def test_junk_azure_traces_raise_only_tally_errors(tmp_path, text):
    traces = pytest.importorskip("tally.bench.traces")
    path = tmp_path / "azure.csv"
    path.write_text(text)
    try:
        trace = traces.load_azure_csv(path)
    except TallyError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(math.isfinite(x) for arr in trace.arrivals_by_function.values() for x in arr)


@SETTINGS
@given(st.one_of(json_values.map(json.dumps), st.text(max_size=80),
                 st.dictionaries(st.sampled_from(["offsets_s", "duration_s", "load", "service_time_s", "source",
                                                  "details"]), json_values, max_size=6).map(json.dumps)))
def test_junk_arrivals_files_raise_only_tally_errors(tmp_path, text):
    traces = pytest.importorskip("tally.bench.traces")
    path = tmp_path / "arrivals.json"
    path.write_text(text)
    _only_tally_errors(traces.Arrivals.read, path)
