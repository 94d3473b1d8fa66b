"""Per-program block-level scheduling records: measurements and decisions.

One file per best-effort program, next to its duration profiles:
`<cache_dir>/blocksched/<name>-<hash>.json`, the same <name>-<hash> as the
program's profile file (`tally.profiles.profile_path`). Format, version 1:

    {"format": "tally-blocksched", "version": 1,
     "checksum": "<sha256 hex of the canonical JSON of kernels>",
     "kernels": [
       {"name": "<mangled>", "grid": [gx, gy, gz], "block": [bx, by, bz], "sms": 132,
        "has_ptx": true, "refusals": {"ptb": "<reason>", ...},
        "measurements": [{"config": "original", "time_ns": 812000.0, "samples": 5,
                          "slice_ns": null, "preempt_p99_ns": null}, ...],
        "decision": {"config": "preemptible:264", "reason": "...", "speed": 0.92,
                     "turnaround_ns": 42000.0, "bound_ns": 100000.0, "floor": 0.5} | null},
       ...]}

(canonical JSON: keys sorted, no spaces, ASCII, no NaN/Infinity). Every field
is checked: a file that is not this format, of another version, whose checksum
does not match, or with any value out of place is not trusted; `read` raises
TallyError, `load` returns nothing after one warning. At most 4096 kernels and
32 MiB. Writes are atomic (temporary file renamed over the old one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tally.blocksched import _files
from tally.blocksched.candidates import MODES
from tally.blocksched.choose import Decision, KernelRecord, Measurement, Policy, choose
from tally.errors import TallyError
from tally.files import atomic_write
from tally.paths import cache_dir

FORMAT = "tally-blocksched"
VERSION = 1
MAX_KERNELS = 4096
MAX_FILE_BYTES = 32 << 20
MAX_TEXT = 4096  # bytes of a name or a reason


@dataclass(frozen=True)
class Entry:
    record: KernelRecord
    decision: Decision | None = None

    @property
    def key(self):
        return self.record.name, tuple(self.record.grid), tuple(self.record.block)


def decisions_path(command: list[str], env_path: str | None = None) -> Path:
    """The program's decisions file (named like its profile file)."""
    from tally.profiles import profile_path

    return cache_dir() / "blocksched" / (profile_path(command, env_path).stem + ".json")


# ------------------------------------------------------------------ encode


def _num(x):
    return None if x is None else float(x)


def _encode_entry(e: Entry) -> dict:
    r = e.record
    out = {
        "name": r.name, "grid": list(r.grid), "block": list(r.block), "sms": r.num_sms, "has_ptx": r.has_ptx,
        "refusals": dict(sorted(r.refusals.items())),
        "measurements": [{"config": m.config, "time_ns": float(m.time_ns), "samples": m.samples,
                          "slice_ns": _num(m.slice_ns), "preempt_p99_ns": _num(m.preempt_p99_ns)}
                         for m in r.measurements],
        "decision": None,
    }
    if e.decision is not None:
        d = e.decision
        out["decision"] = {"config": d.config, "reason": d.reason, "speed": _num(d.speed),
                           "turnaround_ns": _num(d.turnaround_ns), "bound_ns": float(d.bound_ns),
                           "floor": float(d.floor)}
    return out


def dumps(entries: Iterable[Entry]) -> bytes:
    kernels, seen = [], set()
    for e in entries:
        if e.key in seen:
            raise ValueError(f"two entries for {e.key}")
        seen.add(e.key)
        kernels.append(_encode_entry(e))
    if len(kernels) > MAX_KERNELS:
        raise ValueError(f"more than {MAX_KERNELS} kernels")
    kernels.sort(key=lambda k: (k["name"], k["grid"], k["block"]))
    body = _files.canonical_json(kernels)
    return _files.canonical_json({"format": FORMAT, "version": VERSION, "checksum": _files.sha256_hex(body),
                                  "kernels": kernels}) + b"\n"


def write(path: Path | str, entries: Iterable[Entry]) -> None:
    atomic_write(Path(path), dumps(entries), "block scheduling file")


# ------------------------------------------------------------------ decode


class _Bad(Exception):
    pass


def _check(cond, what):
    if not cond:
        raise _Bad(what)


def _int(v, what, lo=1, hi=2**31 - 1):
    _check(type(v) is int and lo <= v <= hi, what)
    return v


def _pos(v, what, optional=False):
    if v is None and optional:
        return None
    _check(type(v) in (int, float) and math.isfinite(v) and v > 0, what)
    return float(v)


def _text(v, what):
    _check(isinstance(v, str) and 0 < len(v.encode("utf-8", "surrogatepass")) <= MAX_TEXT
           and not any(c in v for c in "\r\n\x00"), what)
    return v


def _dims(v, what):
    _check(isinstance(v, list) and len(v) == 3, what)
    return tuple(_int(d, what) for d in v)


def _keys(obj, keys, what):
    _check(isinstance(obj, dict) and set(obj) == set(keys), what)


def _decode_entry(k, i) -> Entry:
    where = f"kernel {i + 1}"
    _keys(k, ("name", "grid", "block", "sms", "has_ptx", "refusals", "measurements", "decision"), where)
    _check(isinstance(k["has_ptx"], bool), f"{where}: has_ptx")
    refusals = k["refusals"]
    _check(isinstance(refusals, dict) and set(refusals) <= set(MODES), f"{where}: refusals")
    refusals = {m: _text(r, f"{where}: refusal") for m, r in refusals.items()}
    ms = k["measurements"]
    _check(isinstance(ms, list) and len(ms) <= 256, f"{where}: measurements")
    measurements, configs = [], set()
    for m in ms:
        _keys(m, ("config", "time_ns", "samples", "slice_ns", "preempt_p99_ns"), f"{where}: measurement")
        _check(isinstance(m["config"], str) and m["config"] not in configs, f"{where}: measurement config")
        configs.add(m["config"])
        try:
            measurements.append(Measurement(m["config"], _pos(m["time_ns"], where), _int(m["samples"], where, 1, 2**63 - 1),
                                            _pos(m["slice_ns"], where, True), _pos(m["preempt_p99_ns"], where, True)))
        except (ValueError, TallyError):
            raise _Bad(f"{where}: measurement") from None
    record = KernelRecord(_text(k["name"], f"{where}: name"), _dims(k["grid"], f"{where}: grid"),
                          _dims(k["block"], f"{where}: block"), _int(k["sms"], f"{where}: sms", 1, 1 << 16),
                          k["has_ptx"], refusals, tuple(measurements))
    d = k["decision"]
    decision = None
    if d is not None:
        _keys(d, ("config", "reason", "speed", "turnaround_ns", "bound_ns", "floor"), f"{where}: decision")
        try:
            decision = Decision(_text(d["config"], where), _text(d["reason"], where), _pos(d["speed"], where, True),
                                _pos(d["turnaround_ns"], where, True), _pos(d["bound_ns"], where),
                                _pos(d["floor"], where))
            decision.candidate  # a valid configuration key
            Policy(decision.bound_ns, decision.floor)
        except (ValueError, TallyError):
            raise _Bad(f"{where}: decision") from None
    return Entry(record, decision)


def parse(data: bytes, source: str = "block scheduling file") -> list[Entry]:
    """The entries of a file's bytes; anything but a well-formed, intact file of
    this version raises TallyError (one line)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_FILE_BYTES:
        raise TallyError(f"{source}: not a tally block scheduling file")
    try:
        doc = _files.strict_json(bytes(data))
    except (ValueError, RecursionError):
        raise TallyError(f"{source}: not a tally block scheduling file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TallyError(f"{source}: not a tally block scheduling file")
    if doc.get("version") != VERSION:
        raise TallyError(f"{source}: block scheduling format version {doc.get('version')!r}, "
                         f"this tally reads version {VERSION}")
    try:
        _keys(doc, ("format", "version", "checksum", "kernels"), "layout")
        kernels = doc["kernels"]
        _check(isinstance(kernels, list) and len(kernels) <= MAX_KERNELS, "kernels")
        _check(doc["checksum"] == _files.sha256_hex(_files.canonical_json(kernels)), "checksum mismatch")
        entries, seen = [], set()
        for i, k in enumerate(kernels):
            e = _decode_entry(k, i)
            _check(e.key not in seen, f"kernel {i + 1} listed twice")
            seen.add(e.key)
            entries.append(e)
    except _Bad as exc:
        raise TallyError(f"{source}: corrupt block scheduling file ({exc})") from None
    return entries


def read(path: Path | str, missing_ok: bool = True) -> list[Entry]:
    path = Path(path)
    try:
        data = _files.read_limited(path, MAX_FILE_BYTES)
    except OSError as exc:
        raise TallyError(f"cannot read block scheduling file {path}: {exc.strerror or exc}") from None
    if data is None:
        if missing_ok:
            return []
        raise TallyError(f"no block scheduling file {path}")
    return parse(data, str(path))


def load(path: Path | str) -> list[Entry]:
    """Like `read`, but a file that cannot be trusted is ignored with one warning."""
    try:
        return read(path)
    except TallyError as exc:
        _files.warn_once(f"decisions:{path}", f"{exc}; ignored")
        return []


def decide(records: Iterable[KernelRecord], policy: Policy = Policy()) -> list[Entry]:
    """Entries with a fresh decision for every record."""
    return [Entry(r, choose(r, policy)) for r in records]
