"""What a search hands the user: the printed reproduce line rebuilds the winner bit for bit,
``max_clean_drop`` decides the winner (library and CLI), a model class no registry knows goes
through ``search_placement`` with and without an output folder."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import ibnify
import ibnify.placement.runs as runs
from ibnify.cli import cli
from ibnify.core import apply_plan
from ibnify.core.plans import ConversionPlan
from ibnify.data.digits import digits_data
from ibnify.errors import IbnifyError
from ibnify.models.small import digits_resnet
from ibnify.placement.search import search_placement
from ibnify.placement.search_report import CandidateResult
from ibnify.train.config import FinetuneConfig
from tests.helpers import digits_search_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_printed_reproduce_line_rebuilds_the_winner_bit_for_bit(tmp_path, monkeypatch) -> None:
    """A model built by name without weights (its init from --seed), read at --input-size 12:
    the line must carry both, the data, the schedule and the seed."""
    monkeypatch.chdir(tmp_path)
    args = [
        "search",
        "ibnify:digits_resnet",
        "--dataset",
        "digits",
        "--input-size",
        "12",
        "--seed",
        "2",
        "--candidates",
        "a:1;b",
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--warmup-epochs",
        "0.5",
        "--batch-size",
        "48",
        "--shift",
        "brightness_down",
        "--max-clean-drop",
        "100",
        "--out",
        "search",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("reproduce: "))
    assert "--input-size 3,12,12" in line and "--seed 2" in line and "--batch-size 48" in line
    for command in line.removeprefix("reproduce: ").split(" && "):
        argv = shlex.split(command)
        assert argv[0] == "ibnify"
        done = CliRunner().invoke(cli, argv[1:])
        assert done.exit_code == 0, done.output
    rebuilt = load_file(str(tmp_path / "runs" / "ibn" / "model.safetensors"))
    best = load_file(str(tmp_path / "search" / "best.safetensors"))
    assert rebuilt.keys() == best.keys()
    assert all(torch.equal(rebuilt[k], best[k]) for k in best)


# --- max_clean_drop decides the winner ------------------------------------------------------

# clean and shifted accuracy each candidate is given: a:1 scores best under shift but loses
# 5 points of clean accuracy against the control; b loses 0.5
_MEASURED = {"control": (0.90, 0.50), "a:1": (0.85, 0.80), "b": (0.895, 0.70)}


def _measured(self, candidate, model, seconds, rung=False) -> CandidateResult:
    clean, shifted = _MEASURED[candidate.name]
    return CandidateResult(
        candidate.name,
        candidate.layout,
        list(candidate.stages),
        candidate.ratio,
        {"clean": clean, "brightness_down": shifted},
        seconds,
    )


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(runs.Search, "measure", _measured)
    torch.manual_seed(0)
    base = digits_resnet(width=4)
    checkpoint_plan = ConversionPlan(
        arch="ibnify:digits_resnet",
        layout="none",
        stages=(),
        ratio=None,
        sites=(),
        extras={"model_kwargs": {"width": 4}},
    )
    return base, checkpoint_plan


def test_max_clean_drop_excludes_the_candidate_that_would_win(tiny, tmp_path) -> None:
    base, _plan = tiny
    config = FinetuneConfig(epochs=1, lr=0.05, quiet=True, device="cpu")
    options = {
        "candidates": "a:1;b",
        "config": config,
        "shifts": "brightness_down",
        "arch": "ibnify:digits_resnet",
        "model_kwargs": {"width": 4},
    }
    train, val = digits_data("train"), digits_data("test")
    limited = search_placement(base, train, val, out_dir=tmp_path, max_clean_drop=1.0, **options)
    assert [r.name for r in limited.ranked()] == ["b", "a:1"]
    assert limited.winner.name == "b" and limited.to_dict()["excluded"] == ["a:1"]
    assert (tmp_path / "best.safetensors").read_bytes() == (
        tmp_path / "candidates" / "b.safetensors"
    ).read_bytes()
    free = search_placement(base, train, val, out_dir=tmp_path, max_clean_drop=None, **options)
    assert free.reused == ["control", "a:1", "b"]  # the rule re-ranks the study; no training
    assert free.winner.name == "a:1"
    assert (tmp_path / "best.safetensors").read_bytes() == (
        tmp_path / "candidates" / "a_1.safetensors"
    ).read_bytes()


def test_cli_max_clean_drop_reaches_the_ranking(tiny, tmp_path) -> None:
    base, plan = tiny
    checkpoint = tmp_path / "base.safetensors"
    ibnify.save(apply_plan(base, plan), checkpoint)
    common = digits_search_argv(checkpoint, tmp_path / "s")
    winners = {}
    for limit in ("1", "6"):
        result = CliRunner().invoke(cli, [*common, "--max-clean-drop", limit])
        assert result.exit_code == 0, result.output
        winners[limit] = json.loads((tmp_path / "s" / "report.json").read_text())["winner"]
        if limit == "1":
            row = next(x for x in result.output.splitlines() if x.startswith("| -") and "a:1" in x)
            assert "excluded: clean -5.0 vs control" in row
            assert "winner: b (clean 89.5%, -0.5 points vs the control" in result.output
    assert winners == {"1": "b", "6": "a:1"}


# --- a model class no registry knows --------------------------------------------------------


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class StudentNet(nn.Module):
    """A user's own CNN: a stem and two stages of conv-BN-ReLU, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        block = _block
        self.stem = block(3, 8, 1)
        self.stage1 = block(8, 8, 1)
        self.stage2 = block(8, 16, 2)
        self.stage3 = block(16, 16, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


class NoNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_search_on_a_model_class_no_registry_knows(tmp_path) -> None:
    torch.manual_seed(1)
    model = StudentNet()
    model.train()
    model.stage1[1].weight.data.uniform_(0.5, 1.5)  # non-trivial affine: a mutation would show
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(epochs=1, lr=0.05, quiet=True, device="cpu")
    train, val = digits_data("train"), digits_data("test")
    options = {
        "candidates": "a:1;a:1-2",
        "config": config,
        "shifts": "brightness_down",
        "max_clean_drop": None,
    }
    bare = search_placement(model, train, val, **options)
    kept = search_placement(model, train, val, out_dir=tmp_path, **options)
    assert [r.accuracy for r in bare.results] == [r.accuracy for r in kept.results]
    assert kept.winner is not None and bare.winner.name == kept.winner.name
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded = ibnify.load(tmp_path / "best.safetensors", base=StudentNet())
    saved = load_file(str(tmp_path / "best.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(IbnifyError, match="StudentNet"):
        ibnify.load(tmp_path / "best.safetensors")  # the file says it needs its base


def test_a_model_that_cannot_be_searched_is_refused_before_training(tmp_path) -> None:
    out = tmp_path / "out"
    config = FinetuneConfig(epochs=1, quiet=True, device="cpu")
    with pytest.raises(IbnifyError, match="BatchNorm") as caught:
        search_placement(
            NoNorm(),
            digits_data("train"),
            digits_data("test"),
            config=config,
            candidates="a:1",
            out_dir=out,
        )
    assert "\n" not in str(caught.value) and "0x" not in str(caught.value)
    assert not out.exists()
