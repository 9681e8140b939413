"""One error style for outputs the system refuses: one line naming the user's path (never a temp
file), the same from every atomic write and every output check, in the library and the CLI."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ibnify
from ibnify._io import (
    atomic_output,
    atomic_write_bytes,
    check_output_dir,
    check_output_path,
    output_error,
)
from ibnify.cli import cli
from ibnify.data.digits import digits_data
from ibnify.demo import DemoConfig, run_demo
from ibnify.errors import InvalidOptionError

ROOT = os.geteuid() == 0  # root writes into a chmod-ed folder: refuse through the OS calls


@pytest.mark.parametrize(
    ("code", "strerror", "line"),
    [
        (errno.EROFS, "Read-only file system", "is not writable (read-only file system)"),
        (errno.EACCES, "Permission denied", "is not writable (permission denied)"),
        (errno.EPERM, "Operation not permitted", "is not writable (operation not permitted)"),
        (errno.ENOSPC, "No space left on device", "could not be written (no space left on device)"),
        (errno.EIO, "Input/output error", "could not be written"),
    ],
)
def test_every_os_refusal_maps_to_one_line(code: int, strerror: str, line: str) -> None:
    temp = "out/.m.onnx.0a1b2c3d.tmp"
    exc = OSError(code, strerror, temp)
    error = output_error(exc, "out/m.onnx")
    assert isinstance(error, InvalidOptionError)
    assert str(error) == f"output 'out/m.onnx' {line}"


def _refuse_replace(monkeypatch: pytest.MonkeyPatch, code: int = errno.EROFS) -> None:
    """Every rename fails as on a read-only file system (the last step of an atomic write)."""

    def refuse(source: object, destination: object) -> None:
        raise OSError(code, os.strerror(code), str(source), None, str(destination))

    monkeypatch.setattr(os, "replace", refuse)


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_an_atomic_write_names_the_output_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"earlier")
    if not tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    _refuse_replace(monkeypatch)
    with pytest.raises(InvalidOptionError) as raised:
        atomic_write_bytes(target, b"new")
    assert str(raised.value) == f"output {str(target)!r} is not writable (read-only file system)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() == b"earlier"


def test_atomic_output_maps_a_refused_temp_file_to_the_output(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(InvalidOptionError) as raised, atomic_output(target) as temp:
        raise PermissionError(errno.EACCES, "Permission denied", str(temp))
    assert str(raised.value) == f"output {str(target)!r} is not writable (permission denied)"
    assert ".tmp" not in str(raised.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError), atomic_output(target):  # other errors pass through
        raise KeyError("x")


def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder`` refuse new files: chmod where that binds; as root, through ``touch``."""
    if not ROOT:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return
    real_touch = Path.touch

    def touch(self: Path, *args, **kwargs) -> None:
        if self.parent == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_touch(self, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", touch)


def test_the_output_checks_say_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    _read_only(folder, monkeypatch)
    reason = " (read-only file system)" if ROOT else " (permission denied)"
    expected = f"output directory {str(folder)!r} is not writable{reason}"
    for check in (check_output_dir, lambda p: check_output_path(p / "m.onnx")):
        with pytest.raises(InvalidOptionError) as raised:
            check(folder)
        assert str(raised.value) == expected
    with pytest.raises(InvalidOptionError) as raised:  # a folder to be made inside it
        check_output_dir(folder / "run" / "deeper")
    assert str(raised.value) == expected


def test_finetune_and_the_demo_refuse_a_read_only_out_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    tiny = ibnify.convert("ibnify:digits_resnet", stages=(1,), model_kwargs={"width": 4})
    checkpoint = tmp_path / "m.safetensors"
    ibnify.save(tiny, checkpoint)
    _read_only(folder, monkeypatch)
    reason = " (read-only file system)" if ROOT else " (permission denied)"
    expected = f"output directory {str(folder)!r} is not writable{reason}"
    with pytest.raises(InvalidOptionError) as raised:
        ibnify.finetune(tiny, digits_data("train"), out_dir=str(folder / "run"), quiet=True)
    assert str(raised.value) == expected
    with pytest.raises(InvalidOptionError) as raised:
        run_demo(folder, DemoConfig.quick(0))
    assert str(raised.value) == expected
    argv = ["finetune", str(checkpoint), "--dataset", "digits", "--out", str(folder / "run")]
    result = CliRunner().invoke(cli, argv)
    assert (result.exit_code, result.output) == (1, f"error: {expected}\n")
    result = CliRunner().invoke(cli, ["demo", "--out", str(folder), "--quick"])
    assert (result.exit_code, result.output) == (1, f"error: {expected}\n")
    assert list(folder.iterdir()) == []


def _few_digits():
    """128 digits images: one short epoch."""
    data = digits_data("train")
    data.dataset = torch.utils.data.Subset(data.dataset, range(128))
    return data


def test_a_write_refused_mid_run_names_the_runs_file_and_frees_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder passed the checks, then the file system turned read-only under the run."""
    tiny = ibnify.convert("ibnify:digits_resnet", stages=(1,), model_kwargs={"width": 4})
    _refuse_replace(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(InvalidOptionError) as raised:
        ibnify.finetune(tiny, _few_digits(), out_dir=str(out), epochs=1, quiet=True)
    checkpoint = out / "checkpoint.pt"
    assert str(raised.value) == (
        f"output {str(checkpoint)!r} is not writable (read-only file system)"
    )
    assert not out.exists()  # no temp file, no lock: the folder it made is gone again
