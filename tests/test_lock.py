"""One run per output folder: a lock file created atomically, refused while its process lives,
taken over when it is gone, removed on every way out; fine-tuning and the demo hold it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ibnify
from ibnify._io import LOCK_FILE, output_lock
from ibnify.cli import cli
from ibnify.data.digits import digits_data
from ibnify.demo import DemoConfig, run_demo
from ibnify.errors import InvalidOptionError
from tests.helpers import digits_search_setup

# A second process that takes the lock, says so, and holds it until its stdin closes.
HOLDER = (
    "import sys; from ibnify._io import output_lock\n"
    "with output_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


def _plant(folder: Path, pid: int, host: str | None = None, started: str = "then") -> Path:
    """A lock file as another run would have written it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": started, "token": "x"}
    (folder / LOCK_FILE).write_text(json.dumps(record))
    return folder / LOCK_FILE


def _in_use(folder: Path, pid: int, started: str, flag: str = "`out_dir`") -> str:
    return (
        f"output folder {str(folder)!r} is in use by another ibnify run (pid {pid}, started "
        f"{started}); wait for it or choose another {flag}"
    )


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    code = "import os; print(os.getpid())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(done.stdout)


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        record = json.loads((folder / LOCK_FILE).read_text())
        assert (record["pid"], record["host"]) == (holder.pid, socket.gethostname())
        with pytest.raises(InvalidOptionError) as raised, output_lock(folder):
            pass
        assert str(raised.value) == _in_use(folder, holder.pid, record["started"])
        assert (folder / LOCK_FILE).exists()  # the refused run left the holder's lock alone
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not folder.exists()  # the holder made the folder, left it empty and removed it
    with output_lock(folder) as held:  # free again
        assert held == folder and json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_of_a_live_foreign_pid_refuses_and_another_hosts_lock_too(tmp_path: Path) -> None:
    lock = _plant(tmp_path / "a", os.getppid(), started="2026-12-06 10:00:00 UTC")
    with pytest.raises(InvalidOptionError) as raised, output_lock(tmp_path / "a"):
        pass
    assert str(raised.value) == _in_use(tmp_path / "a", os.getppid(), "2026-12-06 10:00:00 UTC")
    assert json.loads(lock.read_text())["pid"] == os.getppid()
    # on another host the pid cannot be asked: the lock holds, and says where it lives
    _plant(tmp_path / "b", _dead_pid(), host="elsewhere", started="t0")
    with pytest.raises(InvalidOptionError) as raised, output_lock(tmp_path / "b"):
        pass
    lock = tmp_path / "b" / LOCK_FILE
    assert str(raised.value).endswith(
        "on elsewhere, started t0); wait for it or choose another `out_dir`, or delete "
        f"{str(lock)!r} if that run has ended"
    )


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path: Path, caplog) -> None:
    pid = _dead_pid()
    lock = _plant(tmp_path, pid, started="t0")
    (tmp_path / "kept.txt").write_text("an earlier run's file")
    with caplog.at_level(logging.WARNING, logger="ibnify._io"), output_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records if r.name == "ibnify._io"] == [
        f"took over the lock of {tmp_path}: an earlier ibnify run (pid {pid}, started t0) "
        "no longer runs"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]


def test_an_unreadable_lock_is_held_while_young_and_taken_over_when_old(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_FILE
    lock.write_text("")  # a run between creating its lock and writing its record
    young = "its lock is being written"
    with pytest.raises(InvalidOptionError, match=young), output_lock(tmp_path):
        pass
    old = time.time() - 60
    os.utime(lock, (old, old))
    with output_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, ValueError])
def test_the_lock_goes_on_ctrl_c_and_on_error(tmp_path: Path, stop: type[BaseException]) -> None:
    made, existing = tmp_path / "new" / "run", tmp_path / "old"
    existing.mkdir()
    (existing / "model.safetensors").write_bytes(b"earlier")
    for folder in (made, existing):
        with pytest.raises(stop), output_lock(folder):
            assert (folder / LOCK_FILE).is_file()
            raise stop()
    assert not made.exists() and (tmp_path / "new").is_dir()  # only the folder it made
    assert sorted(p.name for p in existing.iterdir()) == ["model.safetensors"]


def test_finetune_refuses_a_held_folder_before_training(tmp_path: Path) -> None:
    tiny = ibnify.convert("ibnify:digits_resnet", stages=(1,), model_kwargs={"width": 4})
    data = digits_data("train")
    _plant(tmp_path / "run", os.getppid(), started="t1")
    with pytest.raises(InvalidOptionError) as raised:
        ibnify.finetune(tiny, data, out_dir=str(tmp_path / "run"), epochs=1, quiet=True)
    assert str(raised.value) == _in_use(tmp_path / "run", os.getppid(), "t1")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]
    checkpoint = tmp_path / "m.safetensors"
    ibnify.save(tiny, checkpoint)
    argv = ["finetune", str(checkpoint), "--dataset", "digits", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, argv)
    assert (result.exit_code, result.output) == (
        1,
        f"error: {_in_use(tmp_path / 'run', os.getppid(), 't1', '--out')}\n",
    )
    # a run of its own holds the lock while it trains and leaves only its files
    seen: list[bool] = []
    result = ibnify.finetune(
        tiny,
        data,
        out_dir=str(tmp_path / "own"),
        epochs=1,
        batch_size=256,
        quiet=True,
        on_epoch=lambda _: seen.append((tmp_path / "own" / LOCK_FILE).is_file()),
    )
    assert seen == [True]
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == [
        "checkpoint.pt",
        "metrics.jsonl",
        "model.safetensors",
    ]


def test_the_demo_refuses_a_held_folder_before_building(tmp_path: Path) -> None:
    _plant(tmp_path, os.getppid(), started="t2")
    with pytest.raises(InvalidOptionError) as raised:
        run_demo(tmp_path, DemoConfig.quick(0))
    assert str(raised.value) == _in_use(tmp_path, os.getppid(), "t2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_the_search_refuses_a_held_folder_and_holds_its_own_while_it_runs(tmp_path: Path) -> None:
    model, train, test, config = digits_search_setup()
    out = tmp_path / "search"
    _plant(out, os.getppid(), started="t3")
    asked = {"candidates": "a:1", "config": config, "shifts": "brightness_down"}
    with pytest.raises(InvalidOptionError) as raised:
        ibnify.search_placement(model, train, test, out_dir=str(out), **asked)
    assert str(raised.value) == _in_use(out, os.getppid(), "t3")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing ran, nothing written
    (out / LOCK_FILE).unlink()
    # its own run holds the folder while candidates train, and lets it go at the end
    seen: list[bool] = []
    report = ibnify.search_placement(
        model,
        train,
        test,
        out_dir=str(out),
        echo=lambda _line: seen.append((out / LOCK_FILE).is_file()),
        **asked,
    )
    assert seen and all(seen)
    assert not (out / LOCK_FILE).exists() and report.winner is not None
