"""Small file helpers shared by the decisions file and the kernel cache
(atomic writes are tally.files.atomic_write)."""
from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    """`tally: warning: <message>` on stderr, once per key per process."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    print(f"tally: warning: {message}", file=sys.stderr, flush=True)


def reset_warnings() -> None:
    with _warned_lock:
        _warned.clear()


def read_limited(path: Path, limit: int) -> bytes | None:
    """The file's bytes (None if missing); more than `limit` bytes reads as limit+1."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        return None


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_head(data: bytes, what: str, limit: int | None = None) -> tuple[object, bytes, bytes]:
    """(value, its bytes, the rest) of `data` = one strict-JSON line + payload; the line may be at
    most `limit` bytes. ValueError("no <what> line" / "<what> is not JSON") otherwise."""
    newline = data.find(b"\n", 0, limit)
    if newline < 0:
        raise ValueError(f"no {what} line")
    try:
        value = strict_json(data[:newline])
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not JSON") from None
    return value, data[:newline], data[newline + 1:]


def strict_json(data: bytes):
    """JSON bytes -> value; NaN/Infinity, duplicate keys, non-UTF-8 raise ValueError."""
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=_reject_constant)
