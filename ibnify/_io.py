"""Atomic file output: every file ibnify writes goes to a temp file, is fsynced, then renamed."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import IbnifyError

__all__ = ["atomic_output", "atomic_write_bytes", "check_output_path"]


def check_output_path(
    path: str | os.PathLike[str], force: bool = False, suffixes: Sequence[str] = ()
) -> Path:
    """Validate an output path before any work starts; return it as a Path.

    ``suffixes`` (e.g. ``(".onnx",)``) are the file types the caller writes; a name with
    another suffix is refused, so that no file is written under a misleading name.

    Raises:
        IbnifyError: the directory is missing or not writable, the path is a directory, the
            suffix is not one of ``suffixes``, or the file exists and ``force`` is False.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IbnifyError(f"output {str(target)!r} is a directory; give a file name")
    if suffixes and target.suffix.lower() not in suffixes:
        wanted = " or ".join(suffixes)
        raise IbnifyError(
            f"output {str(target)!r} does not end in {wanted}; this command writes {wanted} "
            f"files, e.g. {str(target.with_suffix(suffixes[0]))!r}"
        )
    if not parent.is_dir():
        raise IbnifyError(f"output directory {str(parent)!r} does not exist; create it first")
    if not _can_create_in(parent):
        raise IbnifyError(f"output directory {str(parent)!r} is not writable")
    if target.exists() and not force:
        raise IbnifyError(
            f"output file {str(target)!r} already exists; pass `force=True` to overwrite"
        )
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


def _can_create_in(directory: Path) -> bool:
    """Probe by creating a file: ``os.access`` says yes to root even on read-only places."""
    probe = directory / f".ibnify-probe-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash at any point leaves no partial file.

    On Linux the bytes go into an unnamed ``O_TMPFILE`` inode that vanishes if the process dies
    (even by SIGKILL); only the finished, fsynced file is linked into the directory and renamed
    over ``path``. Elsewhere it falls back to a named temp file plus rename.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    flag = getattr(os, "O_TMPFILE", None)
    fd = None
    if flag is not None and Path("/proc/self/fd").is_dir():
        try:
            fd = os.open(directory, flag | os.O_WRONLY, 0o644)
        except OSError:  # filesystem without O_TMPFILE support
            fd = None
    if fd is None:
        with atomic_output(target) as temp:
            temp.write_bytes(data)
        return target
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        # A dir fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW), which links the inode
        # behind the /proc symlink; plain link() would try to link the symlink itself.
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.link(f"/proc/self/fd/{fd}", temp, src_dir_fd=directory_fd)
        finally:
            os.close(directory_fd)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    _fsync_directory(directory)
    return target


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
