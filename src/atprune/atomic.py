"""Files that appear whole or not at all: written to a temporary file beside the target, then renamed over it.

An interrupted run (error, Ctrl-C, full disk) leaves the old file, or none, never half of a new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back at once: not thread-safe against
    another thread creating files in that instant)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file in ``path``'s folder for writing (``mode`` ``"w"`` text UTF-8 or ``"wb"``); when the
    ``with`` block ends normally the data are flushed to disk, the file gets the permissions the umask gives a new
    file and replaces ``path`` in one rename (a symbolic link at ``path`` is replaced, not written through), and the
    folder entry is synced. On any exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        ValueError: ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: the folder does not exist or is not writable (raised on entering the ``with`` block), or the disk
            is full.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes with mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
