"""Atomic file output: every file ibnify writes goes to a temp file, is fsynced, then renamed."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IbnifyError

__all__ = ["atomic_output", "check_output_path"]


def check_output_path(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Validate an output path before any work starts; return it as a Path.

    Raises:
        IbnifyError: the directory is missing or not writable, the path is a directory, or the
            file exists and ``force`` is False.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IbnifyError(f"output {str(target)!r} is a directory; give a file name")
    if not parent.is_dir():
        raise IbnifyError(f"output directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IbnifyError(f"output directory {str(parent)!r} is not writable")
    if target.exists() and not force:
        raise IbnifyError(f"output file {str(target)!r} already exists; pass --force to overwrite")
    return target


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception (or KeyboardInterrupt) the temp file is removed and ``path`` is untouched.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        with open(temp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        _fsync_directory(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
