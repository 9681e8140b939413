"""The search as an Optuna study: workers sharing one storage, a killed worker, a joined
process, fingerprints, Ctrl-C and resume, pruning, a sampled space.

A tiny digits ResNet (width 4), two epochs at most, one torch thread: each candidate trains in
about a second, so the assertions are about the study (which trials ran, how often, with which
result), compared with a one-worker run in the same test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import ibnify.placement.runs as runs
import ibnify.placement.study as study_module
from ibnify.cli import cli
from ibnify.errors import InvalidOptionError
from ibnify.placement.study import PRUNERS, STUDY_FILE, SearchInterrupted, StudyOptions
from ibnify.train.config import FinetuneConfig
from tests.helpers import digits_search_setup, run_digits_search

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "ibnify:digits_resnet"
CANDIDATES = "a:1;a:1-2;a:1-3;b"
NAMES = ["control", "a:1", "a:1-2", "a:1-3", "b"]
# the journal lock a killed worker may leave is broken after grace / 2 = 3 s
FAST = {"heartbeat_s": 0.2, "grace_s": 6.0}


@pytest.fixture(scope="module")
def setup():
    """Tiny trained base, digits data, a two-epoch schedule; one thread for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield digits_search_setup(epochs=2, warmup_epochs=0.5, workers=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The one-worker, no-pruning search every other run is compared with."""
    out = tmp_path_factory.mktemp("reference")
    return _search(setup, out, halving=False), out


def _search(setup, out: Path | None, study: StudyOptions | None = None, **kwargs):
    return run_digits_search(setup, out, **{"candidates": CANDIDATES, "study": study, **kwargs})


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    backend = optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE))
    storage = optuna.storages.JournalStorage(backend)
    return optuna.load_study(study_name="ibnify-search", storage=storage).get_trials()


def _finished(trials) -> list[str]:
    return sorted(t.user_attrs["candidate"] for t in trials if t.state == TrialState.COMPLETE)


def test_two_workers_on_one_journal_run_each_candidate_once(setup, reference, tmp_path) -> None:
    full, full_out = reference
    study = StudyOptions(workers=2, threads=1, **FAST)
    report = _search(setup, tmp_path, study, halving=False)
    trials = _trials(tmp_path)
    assert _finished(trials) == sorted(NAMES) and len(trials) == len(NAMES)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    assert [r.name for r in report.results] == NAMES
    assert {r.name: r.accuracy for r in report.results} == {
        r.name: r.accuracy for r in full.results
    }
    assert report.winner.name == full.winner.name
    assert (tmp_path / "best.safetensors").read_bytes() == (
        full_out / "best.safetensors"
    ).read_bytes()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _kill_once(marker: Path, slug: str, signum: int):
    """A finetune that, the first time it trains ``slug``, sends ``signum`` to its process
    after epoch 1 (its epoch checkpoint written)."""
    real = runs.finetune

    def finetune(model, data, config, **kwargs):
        on_epoch = kwargs.pop("on_epoch", None)

        def hook(metrics):
            if on_epoch is not None:
                on_epoch(metrics)
            if str(config.out_dir).endswith(slug) and not marker.exists():
                marker.write_text("done")
                os.kill(os.getpid(), signum)

        return real(model, data, config, on_epoch=hook, **kwargs)

    return finetune


def test_a_worker_killed_mid_trial_loses_nothing(setup, reference, tmp_path, monkeypatch) -> None:
    full, _ = reference
    marker = tmp_path / "killed"
    monkeypatch.setattr(runs, "finetune", _kill_once(marker, "a_1-2", signal.SIGKILL))
    lines: list[str] = []
    study = StudyOptions(workers=2, threads=1, **FAST)
    report = _search(setup, tmp_path / "out", study, halving=False, echo=lines.append)
    assert marker.exists()
    trials = _trials(tmp_path / "out")
    assert _finished(trials) == sorted(NAMES)  # every candidate, once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["candidate"] for t in failed] == ["a:1-2"]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["candidate"] == "a:1-2"
    assert any("was killed; a new worker takes its place" in line for line in lines)
    # the retry continued from the killed run's epoch checkpoint: the same numbers
    assert {r.name: r.accuracy for r in report.results} == {
        r.name: r.accuracy for r in full.results
    }


def test_ctrl_c_then_rerun_reuses_finished_trials(setup, reference, tmp_path, monkeypatch) -> None:
    full, full_out = reference
    marker = tmp_path / "interrupted"
    monkeypatch.setattr(runs, "finetune", _kill_once(marker, "a_1-2", signal.SIGINT))
    out = tmp_path / "out"
    with pytest.raises(SearchInterrupted, match="rerun the same command to resume") as caught:
        _search(setup, out, halving=False)
    assert "2 finished candidates are kept in" in str(caught.value)
    trials = _trials(out)
    assert _finished(trials) == ["a:1", "control"]
    assert [t.state for t in trials if t.user_attrs["candidate"] == "a:1-2"] == [TrialState.FAIL]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    assert not (out / "report.json").exists()
    calls: list[bool] = []
    real = runs.finetune

    def counting(model, data, config, **kwargs):
        calls.append(config.resume)
        return real(model, data, config, **kwargs)

    monkeypatch.setattr(runs, "finetune", counting)
    resumed = _search(setup, out, halving=False)
    assert resumed.reused == ["control", "a:1"]
    # a:1-3 and b were waiting already; a:1-2, enqueued again, continues from its epoch 1
    assert calls == [False, False, True]
    assert [r.accuracy for r in resumed.results] == [r.accuracy for r in full.results]
    assert (out / "best.safetensors").read_bytes() == (full_out / "best.safetensors").read_bytes()


def test_pruned_search_keeps_the_full_runs_winner_bit_for_bit(setup, reference, tmp_path) -> None:
    full, full_out = reference
    halved = _search(setup, tmp_path)  # halving by default with 4 candidates
    assert full.halving == [] and halved.halving == [1]
    stopped = [r for r in halved.results if not r.full]
    assert stopped and all(r.stopped_at == 1 and r.epochs == 1 for r in stopped)
    assert "control" not in [r.name for r in stopped]
    assert halved.winner is not None and halved.winner.name == full.winner.name
    assert (tmp_path / "best.safetensors").read_bytes() == (
        full_out / "best.safetensors"
    ).read_bytes()
    for result in halved.results:  # every survivor's numbers are the full run's
        if result.full:
            twin = next(r for r in full.results if r.name == result.name)
            assert result.accuracy == twin.accuracy
    trials = _trials(tmp_path)
    reported = {t.user_attrs["candidate"]: t.intermediate_values for t in trials}
    assert reported["control"] == {}  # the control never reports, so it is never pruned
    assert all(list(values) == [1] for name, values in reported.items() if name != "control")
    states = {t.user_attrs["candidate"]: t.state for t in trials}
    assert sorted(n for n, s in states.items() if s == TrialState.PRUNED) == sorted(
        r.name for r in stopped
    )
    notes = [
        line for line in halved.table().splitlines() if "halving: stopped after epoch 1" in line
    ]
    assert len(notes) == len(stopped)


def test_a_study_with_other_settings_is_refused(setup, reference, tmp_path) -> None:
    _full, out = reference
    config = setup[3]
    other = FinetuneConfig(**{**config.__dict__, "lr": 0.07})
    with pytest.raises(InvalidOptionError, match=r"differs in: finetune\.lr 0\.05 → 0\.07\)"):
        _search(
            setup,
            tmp_path,
            StudyOptions(storage=str(out / STUDY_FILE), join=True),
            config=other,
            halving=False,
        )
    assert not any(tmp_path.iterdir())  # the refused worker wrote nothing


def test_space_with_a_fixed_seed_proposes_the_same_trials(setup, tmp_path) -> None:
    space = StudyOptions(space="a:1-2@0.25..0.75;b", trials=4, analyze_first=False)
    proposed = []
    for name in ("one", "two"):
        report = _search(setup, tmp_path / name, space, halving=False)
        proposed.append([t.params for t in _trials(tmp_path / name) if t.params])
        assert report.results[0].name == "control"
    assert proposed[0] == proposed[1] and len(proposed[0]) == 4
    for params in proposed[0]:
        assert params["item"] in ("0", "1")
        if params["item"] == "0":
            assert 1 <= params["depth:0"] <= 2 and 0.25 <= params["ratio:0"] <= 0.75
    base, train, val, config = setup
    other = FinetuneConfig(**{**config.__dict__, "seed": 4})
    _search((base, train, val, other), tmp_path / "three", space, halving=False)
    assert [t.params for t in _trials(tmp_path / "three") if t.params] != proposed[0]


def test_space_seeds_its_first_trial_with_the_analyze_suggestion(setup, tmp_path) -> None:
    space = StudyOptions(space="a:1-2@0.25..0.75;b", trials=1)
    report = _search(setup, tmp_path, space, halving=False)
    first = next(t for t in _trials(tmp_path) if t.params)
    assert first.params == {"item": "0", "depth:0": 2, "ratio:0": 0.5}  # analyze says 1-2
    assert [r.name for r in report.results] == ["control", "a:1-2@0.5"]


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "ibnify", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_machine_joins_over_sqlite(tmp_path) -> None:
    """Two processes, one storage URL: the one that starts the study and one that ``--join``s
    it (started first, it waits); both take trials, each candidate runs once."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = [
        "search",
        SOURCE,
        "--dataset",
        "digits",
        "--candidates",
        "a:1;a:1-2;a:1@0.25;b",
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--shift",
        "brightness_down",
        "--storage",
        url,
        "--threads",
        "1",
        "--no-halving",
        "--input-size",
        "8",
    ]
    joiner = _cli(*common, "--join", "--out", str(tmp_path / "b"), cwd=tmp_path)
    starter = _cli(*common, "--out", str(tmp_path / "a"), cwd=tmp_path)
    _out_a, err_a = starter.communicate(timeout=300)
    out_b, err_b = joiner.communicate(timeout=300)
    assert starter.returncode == 0, err_a
    assert joiner.returncode == 0, err_b
    assert "joined study ibnify-search: no trial is left" in out_b
    study = optuna.load_study(study_name="ibnify-search", storage=url)
    trials = study.get_trials()
    assert _finished(trials) == sorted(["control", "a:1", "a:1-2", "a:1@0.25", "b"])
    assert len(trials) == 5
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert pids == {str(starter.pid), str(joiner.pid)}
    assert (tmp_path / "a" / "report.json").is_file() and not (
        tmp_path / "b" / "report.json"
    ).exists()


def test_commands_that_do_not_search_do_not_import_optuna(tmp_path) -> None:
    code = (
        "import sys\n"
        "from ibnify.cli import cli\n"
        "for args in (['--help'], ['convert', 'ibnify:digits_resnet', '-o', sys.argv[1]]):\n"
        "    try:\n"
        "        cli.main(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optuna'))\n"
    )
    out = tmp_path / "ibn.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file()  # convert ran
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_cli_pruner_choices_are_the_library_pruners() -> None:
    option = next(p for p in cli.commands["search"].params if p.name == "pruner")
    assert tuple(option.type.choices) == PRUNERS


def test_a_beating_trial_is_kept_and_a_silent_one_is_failed_and_retried_once() -> None:
    """The heartbeat keeps a long trial alive past the grace; once it stops, the first check
    fails the trial and enqueues one retry with its candidate; a second check does nothing."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    study.enqueue_trial({}, user_attrs={"candidate": "a:1-2"})
    trial = study.ask()
    with study_module._heartbeat(trial, 0.05):
        time.sleep(0.6)  # three times the grace below
        assert study_module.fail_stale_trials(study, grace_s=0.2) == []
    time.sleep(0.4)
    assert study_module.fail_stale_trials(study, grace_s=0.2) == [trial.number]
    assert study_module.fail_stale_trials(study, grace_s=0.2) == []
    states = [(t.state, t.user_attrs["candidate"]) for t in study.get_trials()]
    assert states == [(TrialState.FAIL, "a:1-2"), (TrialState.WAITING, "a:1-2")]
    assert study.get_trials()[1].system_attrs["failed_trial"] == trial.number
