"""Atomic file output: every file ibnify writes goes to a temp file, is fsynced, then renamed;
the output checks before any work; the one line for an output the system refuses; the lock that
keeps two runs out of one output folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from .errors import IbnifyError, InvalidOptionError

__all__ = [
    "LOCK_FILE",
    "atomic_output",
    "atomic_write_bytes",
    "check_output_dir",
    "check_output_path",
    "output_error",
    "output_lock",
]

logger = logging.getLogger(__name__)

# The lock file a run holds in its output folder while it writes there.
LOCK_FILE = ".ibnify.lock"
# The errors that mean "this place cannot be written", and those worth naming beside it.
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_NAMED_REASONS = _NOT_WRITABLE | {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# A lock younger than this that cannot be read is being written by its owner, not stale.
_LOCK_GRACE_S = 10.0


def output_error(
    exc: OSError, path: str | os.PathLike[str], what: str = "output", *, probed: bool = False
) -> IbnifyError:
    """The one line for an output the system refused, naming the user's ``path`` (never a temp
    file): ``output 'out/m.onnx' is not writable (read-only file system)``. ``probed``: the
    refusal came from creating a probe file there, so the place is not writable, whatever
    the reason."""
    writable = probed or exc.errno in _NOT_WRITABLE
    verb = "is not writable" if writable else "could not be written"
    reason = f" ({exc.strerror.lower()})" if exc.errno in _NAMED_REASONS and exc.strerror else ""
    return InvalidOptionError(f"{what} {str(path)!r} {verb}{reason}")


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
    refused = _probe(parent)
    if refused is not None:
        raise output_error(refused, parent, "output directory", probed=True) from None
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
    except OSError as exc:
        _unlink_quietly(temp)
        raise output_error(exc, target) from exc
    except BaseException:
        _unlink_quietly(temp)
        raise


def _unlink_quietly(path: Path) -> None:
    """Remove a temp file if it is there; a folder that refuses even that keeps the error."""
    with suppress(OSError):
        path.unlink(missing_ok=True)


def _probe(directory: Path) -> OSError | None:
    """Probe by creating a file (``os.access`` says yes to root even on read-only places):
    None when it can be created, else the system's refusal."""
    probe = directory / f".ibnify-probe-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        return exc
    probe.unlink(missing_ok=True)
    return None


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be created or
    written: the nearest existing folder on its path is probed by creating a file in it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"output {str(out)!r} exists and is not a directory")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    refused = _probe(existing)
    if refused is not None:
        raise output_error(refused, existing, "output directory", probed=True) from None
    return out


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
    try:
        _link_over(fd, data, target, directory)
    except OSError as exc:
        raise output_error(exc, target) from exc
    finally:
        os.close(fd)
    _fsync_directory(directory)
    return target


def _link_over(fd: int, data: bytes, target: Path, directory: Path) -> None:
    """Write ``data`` into the unnamed file ``fd``, link it beside ``target``, rename it over."""
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
        _unlink_quietly(temp)
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


@contextmanager
def output_lock(folder: str | os.PathLike[str], parameter: str = "out_dir") -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this run: a second run that asks for it while
    this one holds it is refused in one line naming the holder; the lock goes on exit, also on
    an error or Ctrl-C, and the folder too when this run created it and left it empty.

    The lock is a file created atomically (``O_CREAT | O_EXCL``) holding the pid, host and
    start time; a lock whose process no longer runs on this host is taken over with a note.
    ``parameter`` is the option that names the folder, for the advice.

    Raises:
        InvalidOptionError: another live run holds the folder, or it cannot be written.
    """
    out = Path(folder)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out, "output directory") from exc
    lock = out / LOCK_FILE
    mine = _take_lock(lock, parameter)
    try:
        yield out
    finally:
        _release_lock(lock, mine)
        if created:
            with suppress(OSError):
                out.rmdir()  # only succeeds on the empty folder this run made


def _take_lock(lock: Path, parameter: str) -> dict[str, object]:
    """Create ``lock`` holding this process's record, taking over a stale one; the record."""
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "token": secrets.token_hex(8),
    }
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and _holder_alive(holder, lock):
                # A run on another host cannot be asked whether it lives: say how to clear it.
                gone = (
                    f", or delete {str(lock)!r} if that run has ended"
                    if holder.get("host") != socket.gethostname()
                    else ""
                )
                raise InvalidOptionError(
                    f"output folder {str(lock.parent)!r} is in use by another ibnify run "
                    f"({_describe(holder)}); wait for it or choose another `{parameter}`{gone}"
                ) from None
            _take_over(lock, holder)
            continue
        except OSError as exc:
            raise output_error(exc, lock.parent, "output directory") from exc
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return record
    raise InvalidOptionError(  # pragma: no cover - three runs racing for one stale lock
        f"output folder {str(lock.parent)!r} is in use by another ibnify run; choose another "
        f"`{parameter}`"
    )


def _read_lock(lock: Path) -> dict[str, object] | None:
    """The holder's record, or None when the lock is gone, empty or not a record."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _holder_alive(holder: dict[str, object], lock: Path) -> bool:
    """Whether the lock's holder still runs: on another host it is assumed so (it cannot be
    asked); on this one its pid must exist."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _take_over(lock: Path, holder: dict[str, object] | None) -> None:
    """Remove a stale lock (its process is gone) with a note; a lock that cannot be read and is
    younger than a few seconds is being written by a live run, and is refused as held."""
    if holder is None:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        if age < _LOCK_GRACE_S:
            raise InvalidOptionError(
                f"output folder {str(lock.parent)!r} is in use by another ibnify run (its "
                "lock is being written); wait for it or choose another output folder"
            )
    # Rename first: of two runs taking over one stale lock, only one renames it away.
    aside = lock.with_name(f"{lock.name}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:  # another run's fresh lock moved meanwhile: put it back
        with suppress(OSError):
            os.link(aside, lock)
    else:
        what = _describe(holder) if holder is not None else "an unreadable lock"
        logger.warning(
            "took over the lock of %s: an earlier ibnify run (%s) no longer runs",
            lock.parent,
            what,
        )
    _unlink_quietly(aside)


def _describe(holder: dict[str, object]) -> str:
    """``pid 123, started 2026-01-01 10:00:00 UTC`` (with the host when it is another one)."""
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {holder['pid']}{where}, started {holder.get('started', 'at an unknown time')}"


def _release_lock(lock: Path, mine: dict[str, object]) -> None:
    """Remove the lock if it is still this run's (a takeover may have replaced it)."""
    if _read_lock(lock) == mine:
        _unlink_quietly(lock)
