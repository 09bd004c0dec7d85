"""Writing files so that nothing is ever half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader (or a run interrupted by Ctrl-C or SIGKILL) sees the old file or the new one, never
    a part. An identical existing file is left untouched, so re-runs keep modification times.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def newest(folder: str | Path, pattern: str = "*") -> str:
    """The most recently modified file in ``folder`` matching ``pattern`` (to resume from).

    Raises:
        FileNotFoundError: when there is none, naming the folder.
    """
    files = [p for p in Path(folder).glob(pattern) if p.is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no file matching {pattern!r} to resume from")
    return str(max(files, key=lambda p: p.stat().st_mtime_ns))
