"""File helpers shared across tally: atomic writes of profiles, block scheduling
decisions, the kernel cache, the daemon's state file and the benchmark's files."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from tally.errors import TallyError


def atomic_write(path: Path, data: bytes, what: str) -> None:
    """A temporary file in the same directory renamed over `path`: readers (other
    runs' agents, other processes) see the old file or the new one, never a part.
    The file ends up mode 0644. Failures raise TallyError("cannot write <what> <path>: ...")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    except OSError as exc:
        raise TallyError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise TallyError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def write_text_atomic(path: Path, text: str, mode: int | None = None, make_parents: bool = True) -> None:
    """`text` to `path` through a temporary file renamed over it (readers polling
    for the file never see a part), with `mode` if given. Missing parent
    directories are made unless make_parents is False; OSError propagates."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    tmp.replace(path)


_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, 0xFFFFFFFFFFFFFFFF
_FAST_FROM_BYTES = 4096  # below this, calling into C costs more than it saves


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a: the agent's hash for profile names and saved code images
    (agent/profiles.c, `tally_fnv1a64`). Images are megabytes, so the agent's own C
    function is used when the built agent is at hand; the Python loop is the fallback."""
    if len(data) >= _FAST_FROM_BYTES:
        fast = _agent_fnv1a64()
        if fast is not None:
            return fast(data, len(data))
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


@functools.lru_cache(maxsize=1)
def _agent_fnv1a64():
    """`tally_fnv1a64` of the installed agent library, or None (not built, not loadable)."""
    try:
        import ctypes

        from tally.cudalibs import agent_path

        fn = ctypes.CDLL(str(agent_path())).tally_fnv1a64
    except (OSError, AttributeError, TallyError):
        return None
    fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t]
    return fn
