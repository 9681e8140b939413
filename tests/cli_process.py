"""Run the ibnify CLI in a fresh process per call without paying the interpreter's imports.

The bad-input matrix runs about fifty commands; through the console script each one spends
about five seconds importing torch, torchvision and timm before it fails in a fraction of a
second. Here a forkserver imports those once (before any torch op, so no thread pool exists
yet) and forks one child per command: a real process with its own exit code, stderr and file
system effects, running ``ibnify.cli.main`` exactly as the console script does.
``tests/test_bad_inputs.py::test_version_still_reports`` and ``tests/test_cli.py`` still run
the installed console script itself.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from click.testing import CliRunner

from ibnify.cli import cli, main

# Imported once in the server; every child starts with them loaded.
_PRELOAD = ["torch", "torchvision", "timm", "onnx", "onnxruntime", "ibnify.api", "ibnify.cli"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([*_PRELOAD, __name__])


def _child(args: list[str], stdout_path: str, stderr_path: str) -> None:
    """In the forked child: stdin from /dev/null, stdout/stderr to files, then the CLI."""
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, stdout_path, os.O_WRONLY | os.O_TRUNC),
        (2, stderr_path, os.O_WRONLY | os.O_TRUNC),
    ):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own stdin)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore does for the console script
    main(args)  # exits through SystemExit; multiprocessing turns its code into the exit code


# What multiprocessing's forkserver reports when it could not read a child's exit status back
# (``popen_forkserver.Popen.poll``); the CLI itself only exits 0, 1 or 2.
_STATUS_LOST = 255


def run_cli(args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``ibnify ARGS`` in a forked child; the result looks like ``subprocess.run``'s.

    A child whose exit status the forkserver lost is run once more: the status belongs to the
    harness, not to the command under test (a command that really exits 255 does so again)."""
    done = _run_forked(args, timeout)
    if done.returncode == _STATUS_LOST:
        done = _run_forked(args, timeout)
    return done


def _run_forked(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """One forked run of ``ibnify ARGS``: exit code, stdout and stderr."""
    with tempfile.TemporaryDirectory(prefix="ibnify-cli-") as folder:
        stdout_path, stderr_path = Path(folder, "stdout"), Path(folder, "stderr")
        stdout_path.touch()
        stderr_path.touch()
        process = _CONTEXT.Process(
            target=_child, args=(list(args), str(stdout_path), str(stderr_path))
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["ibnify", *args], timeout)
        return subprocess.CompletedProcess(
            ["ibnify", *args],
            process.exitcode,
            stdout_path.read_text(errors="replace"),
            stderr_path.read_text(errors="replace"),
        )


# A bad-input case: (CLI arguments after the command, text the one `error:` line must hold).
BadInput = tuple[list, str]


def check_bad_inputs(
    forked: dict[str, BadInput],
    in_process: dict[str, BadInput],
    argv: Callable[[str, list], list[str]],
) -> None:
    """Each case exits 1 with one `error:` line holding its text and no traceback.

    ``forked`` cases run in their own process (:func:`run_cli`), the others through click's
    runner; ``argv(name, args)`` builds the full command line of a case.
    """
    for name, (args, message) in forked.items():
        done = run_cli(argv(name, args), timeout=120)
        _check_one_error_line(name, done.returncode, done.stderr, message)
    for name, (args, message) in in_process.items():
        result = CliRunner().invoke(cli, argv(name, args))
        _check_one_error_line(name, result.exit_code, result.output, message)


def _check_one_error_line(name: str, code: int, output: str, message: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1, (name, output)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, output)
    assert "Traceback" not in output and message in lines[0], (name, lines[0])
