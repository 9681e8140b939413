"""`ibnify search`: candidate layouts converted from one base, fine-tuned alike, ranked.

A tiny digits ResNet (width 4) and one fine-tuning epoch keep each candidate under a second; the
assertions are about the search itself: same seed → same numbers and ranking, finished
candidates are never rerun, the budget stops the queue, bad inputs end in one error line.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

import ibnify
import ibnify.placement.candidates as candidates
import ibnify.placement.runs as runs
from ibnify.api import ResolvedModel
from ibnify.cli import cli
from ibnify.core import apply_plan
from ibnify.core.plans import ConversionPlan
from ibnify.errors import InvalidOptionError
from ibnify.placement.candidates import Candidate, parse_candidates
from ibnify.placement.runs import Search
from ibnify.placement.search import SearchInputs, search_placement
from ibnify.placement.search_state import differences, search_settings
from ibnify.placement.study import STUDY_FILE, StudyOptions
from ibnify.train.config import FinetuneConfig
from tests.cli_process import check_bad_inputs
from tests.helpers import (
    bad_class_folders,
    digits_search_argv,
    digits_search_setup,
    run_digits_search,
)

SOURCE = "ibnify:digits_resnet"
KWARGS = {"width": 4}
CANDIDATES = "a:1;a:1-2;b"
SHIFTS = "brightness_down,contrast_down"


@pytest.fixture(scope="module")
def setup():
    """Tiny base model, digits data, a one-epoch schedule; one thread for the whole module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield digits_search_setup()
    torch.set_num_threads(threads)


def _search(setup, out: Path, **kwargs):
    return run_digits_search(setup, out, **{"candidates": CANDIDATES, **kwargs})


def test_parse_candidates() -> None:
    parsed = parse_candidates("a:1;a:1-2;a:1-3; a:1-2@0.25 ;b;a:1-2")
    assert parsed == [
        Candidate("a", (1,)),
        Candidate("a", (1, 2)),
        Candidate("a", (1, 2, 3)),
        Candidate("a", (1, 2), 0.25),
        Candidate("b"),
    ]
    assert [c.name for c in parsed] == ["a:1", "a:1-2", "a:1-3", "a:1-2@0.25", "b"]
    assert parse_candidates("a:1,3")[0].slug == "a_1+3"
    for bad in ("c", "a:0", "a:2-1", "a:x", "a:1@1.5", "a:1@half", " ; "):
        with pytest.raises(InvalidOptionError):
            parse_candidates(bad)


def test_auto_candidates_for_a_three_stage_resnet(setup) -> None:
    base, _train, val, _config = setup
    auto = candidates.auto_candidates(base, val, shifts="brightness_down")
    # stages 1 and 1-2 (never the last of three); the suggestion is one of them; IBN-b exists
    assert [c.name for c in auto] == ["a:1", "a:1-2", "b"]


def test_search_is_deterministic_and_resumes(setup, tmp_path, monkeypatch) -> None:
    first = _search(setup, tmp_path / "one")
    second = _search(setup, tmp_path / "two")
    names = ["control", "a:1", "a:1-2", "b"]
    assert [r.name for r in first.results] == names
    assert [r.accuracy for r in first.results] == [r.accuracy for r in second.results]
    assert [r.name for r in first.ranked()] == [r.name for r in second.ranked()]
    assert first.table() == second.table()
    scores = [r.score for r in first.ranked()]
    assert scores == sorted(scores, reverse=True)
    assert first.winner is not None and first.winner.name == first.ranked()[0].name
    best = tmp_path / "one" / "best.safetensors"
    assert best.read_bytes() == Path(first.winner.checkpoint).read_bytes()
    assert ibnify.read_recipe(best).layout in ("resnet-a", "resnet-b")
    assert (tmp_path / "one" / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    calls: list[str] = []
    real = runs.finetune

    def counting(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runs, "finetune", counting)
    again = _search(setup, tmp_path / "one")
    assert calls == [] and again.reused == names
    assert again.table() == first.table()

    # the study keeps one finished trial per candidate; a wider list runs only the new one
    journal = tmp_path / "one" / STUDY_FILE
    trials = _study(journal).get_trials()
    assert [t.user_attrs["candidate"] for t in trials] == names
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    wider = _search(setup, tmp_path / "one", candidates=CANDIDATES + ";a:1@0.25")
    assert calls == ["DigitsResNet"] and wider.reused == names
    assert [r.name for r in wider.results] == [*names, "a:1@0.25"]
    assert [r.accuracy for r in wider.results][:4] == [r.accuracy for r in first.results]
    assert len(_study(journal).get_trials()) == 5


def _study(journal: Path) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    return optuna.load_study(
        study_name="ibnify-search", storage=optuna.storages.JournalStorage(backend)
    )


def test_other_settings_in_the_same_out_are_refused(setup, tmp_path) -> None:
    _search(setup, tmp_path, candidates="a:1", budget_min=1e-9)
    other = FinetuneConfig(epochs=1, lr=0.05, seed=4, quiet=True, device="cpu")
    with pytest.raises(InvalidOptionError, match="differs in: finetune"):
        _search(setup, tmp_path, config=other)


def test_a_bad_candidate_fails_before_any_training(setup, tmp_path) -> None:
    with pytest.raises(InvalidOptionError, match="candidate a:1-5: stage 4 is out of range"):
        _search(setup, tmp_path / "out", candidates="a:1;a:1-5")
    assert not (tmp_path / "out").exists()


def test_budget_stops_adding_candidates(setup, tmp_path) -> None:
    report = _search(setup, tmp_path, budget_min=1e-9)
    assert [r.name for r in report.results] == ["control"]  # the first run gives the estimate
    assert report.not_run == ["a:1", "a:1-2", "b"]
    assert report.stopped.startswith("budget: stopped before candidate 2 of 4 (a:1)")
    assert report.winner is None
    states = [t.state.name for t in _study(tmp_path / STUDY_FILE).get_trials()]
    assert states == ["COMPLETE", "WAITING", "WAITING", "WAITING"]  # kept for a rerun


def test_cli_search_prints_ranking_and_reproduce_command(setup, tmp_path) -> None:
    base = setup[0]
    plan = ConversionPlan(
        arch=SOURCE, layout="none", stages=(), ratio=None, sites=(), extras={"model_kwargs": KWARGS}
    )
    checkpoint = tmp_path / "base.safetensors"
    ibnify.save(apply_plan(base, plan), checkpoint)
    out = tmp_path / "search"
    args = digits_search_argv(checkpoint, out)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "candidate 3 of 3: b done in" in result.output
    table = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert [row.split("|")[2].strip() for row in table[1:]][-1] == "control"
    assert len(table) == 1 + 3
    winner = json.loads((out / "report.json").read_text())["winner"]
    layout = "--layout b" if winner == "b" else "--layout a --stages 1"
    line = next(x for x in result.output.splitlines() if x.startswith("reproduce: "))
    assert line.startswith(
        f"reproduce: ibnify convert {SOURCE} --weights {checkpoint} --model-arg width=4 "
        f"--input-size 3,16,16 {layout} "
        "-o ibn.safetensors && ibnify finetune ibn.safetensors --dataset digits --epochs 1 "
        "--lr 0.05 --batch-size 64 --optimizer sgd --weight-decay 0.0001 --warmup-epochs 1 "
        "--seed 0 "
    )
    assert ibnify.load(out / "best.safetensors").layer1[0].conv1.out_channels == 4


def test_bad_inputs_end_in_one_error_line(tmp_path) -> None:
    """Exit 1, one `error:` line, no traceback, nothing written (not even --out). One case runs
    in its own process, the others through click's runner."""
    a, b, empty = (str(path) for path in bad_class_folders(tmp_path).values())
    forked = {
        "different classes": ([SOURCE, "--data", a, "--val-data", b], "different class sets"),
    }
    in_process = {
        "empty folder": ([SOURCE, "--data", empty, "--val-data", a], "holds no images"),
        "unknown shift": ([SOURCE, "--dataset", "digits", "--shift", "sparkle"], "unknown shift"),
        "no batchnorm": (["timm:convnext_atto", "--dataset", "digits"], "has no BatchNorm"),
        "bad candidate": (
            [SOURCE, "--dataset", "digits", "--candidates", "c"],
            "unknown candidate",
        ),
        "bad space": (
            [SOURCE, "--dataset", "digits", "--space", "a:1-2@0.9..0.2", "--trials", "3"],
            "write the ratio range LOW..HIGH",
        ),
        "space without trials": (
            [SOURCE, "--dataset", "digits", "--space", "a;b"],
            "give --space and --trials together",
        ),
        "space beyond the last stage": (
            [SOURCE, "--dataset", "digits", "--space", "a:1-5", "--trials", "2"],
            "stage 5 is out of range (the model has 3 stages)",
        ),
    }
    before = sorted(tmp_path.rglob("*"))

    def argv(name: str, args: list[str]) -> list[str]:
        return ["search", *args, "--out", str(tmp_path / name.replace(" ", "-"))]

    check_bad_inputs(forked, in_process, argv)
    assert sorted(tmp_path.rglob("*")) == before


# A study's fingerprint as the search recorded it before its fine-tuning fields were derived
# from train/config.TRAJECTORY_FIELDS: a rerun of such a study must still match it.
RECORDED_FINETUNE = {
    "epochs": 1,
    "lr": 0.05,
    "batch_size": 64,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "decay_norm_and_bias": True,
    "decay_in_affine": True,
    "warmup_epochs": 1.0,
    "min_lr": 0.0,
    "seed": 3,
}


def test_the_fingerprint_records_the_same_finetune_keys_as_existing_studies(setup) -> None:
    base, train, val, config = setup
    search = Search(
        base=ResolvedModel(base, SOURCE, model_kwargs=KWARGS),
        train=train,
        val=val,
        config=config,
        shifts=["brightness_down"],
        out=None,
        say=lambda _line: None,
    )
    settings = search_settings(search)
    assert settings["finetune"] == RECORDED_FINETUNE
    assert list(settings["finetune"]) == list(RECORDED_FINETUNE)
    assert differences({**settings, "finetune": dict(RECORDED_FINETUNE)}, settings) == []
    other = search_settings(replace(search, config=replace(config, momentum=0.8, min_lr=1e-3)))
    assert differences(settings, other) == [
        "finetune.min_lr 0.0 → 0.001",
        "finetune.momentum 0.9 → 0.8",
    ]


def test_options_and_keywords_ask_the_same_search() -> None:
    """The record a search is asked by and the Python keywords become the same inputs;
    keywords replace its fields; an unknown keyword is refused."""
    study = StudyOptions(workers=2, devices="cpu, cpu", pruner="hyperband")
    assert study.devices == ("cpu", "cpu")  # the command line's text, as a tuple
    config = FinetuneConfig(epochs=2, lr=0.05, seed=3, quiet=True)
    keywords = {
        "candidates": CANDIDATES,
        "config": config,
        "shifts": SHIFTS,
        "budget_min": 1.5,
        "out_dir": "o",
        "force": True,
        "domains": ["x=dx"],
        "objective": "both",
        "max_clean_drop": 2.0,
        "halving": True,
        "study": study,
    }
    options = SearchInputs(**keywords)
    assert SearchInputs.of(options, {}) == SearchInputs.of(None, keywords)
    added = SearchInputs.of(options, {"input_size": (1, 8, 8), "force": False})
    assert (added.input_size, added.force, added.candidates) == ((1, 8, 8), False, CANDIDATES)
    assert SearchInputs.of(None, {}) == SearchInputs(max_clean_drop=1.0, shifts="all")
    with pytest.raises(TypeError, match="epochs"):
        SearchInputs.of(None, {"epochs": 3})


def test_a_resolved_model_carries_the_source_into_every_candidate(setup, tmp_path) -> None:
    """``arch``/``model_kwargs`` with a module and a ResolvedModel record the same source;
    both at once are refused before anything runs."""
    base, train, val, config = setup
    kept = {"candidates": "a:1", "config": config, "shifts": SHIFTS, "halving": False}
    resolved = ResolvedModel(base, SOURCE, model_kwargs=KWARGS)
    report = search_placement(resolved, train, val, out_dir=tmp_path / "r", **kept)
    recipe = ibnify.read_recipe(tmp_path / "r" / "candidates" / "a_1.safetensors")
    assert (recipe.source, dict(recipe.model_kwargs)) == (SOURCE, KWARGS)
    again = _search(setup, tmp_path / "r", **kept)
    assert again.reused == ["control", "a:1"] and again.table() == report.table()
    with pytest.raises(InvalidOptionError, match="names its own source"):
        search_placement(resolved, train, val, arch=SOURCE, **kept)
