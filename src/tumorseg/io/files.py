"""Writing files so that nothing is ever half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def show(path) -> str:
    """A path or name as written in messages: unprintable characters escaped (``\\n``, ``\\x00``,
    ``\\u2028``) and backslashes doubled, so that a message stays one line (a newline in a file
    name cannot forge a second ``error:`` line) and names read back unambiguously."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


def file_digest(path: str | Path, length: int | None = 16) -> str:
    """SHA-256 of a file (a datalist, a checkpoint, an export's file), read in blocks, cut to
    ``length`` hex digits (None: all 64). The one digest of the project: runs, exports and MONAI
    Label's records name weights by it."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


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
