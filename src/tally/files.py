"""File helpers shared across tally: atomic writes of profiles, block scheduling
decisions, the kernel cache, the daemon's state file and the benchmark's files."""
from __future__ import annotations

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
