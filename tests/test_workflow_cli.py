"""The command line as a user chains it (issues 16 and 17): one source for choices and
defaults, help on a bare ``ibnify``, export options checked up front, readable epoch lines,
Ctrl-C that says what was kept, ``--threads``, ``--input-size`` carried into the data, and the
Python API taking what the CLI takes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import ibnify
import ibnify.placement.divergence as divergence
import ibnify.train.loop as loop
from ibnify import constants
from ibnify.cli import cli
from ibnify.core import graph
from ibnify.data.images import DataError
from ibnify.data.shifts import SHIFTS
from ibnify.train.config import TRAJECTORY_FIELDS, FinetuneConfig
from ibnify.train.state import resume_options
from tests.cli_process import check_bad_inputs

DIGITS = "ibnify:digits_resnet"
EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  loss \d+\.\d{3}  acc \d+\.\d%  lr [0-9.e-]+  \d+\.\d s  val \d+\.\d%$"
)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A converted 4-wide digits ResNet (a few thousand parameters)."""
    path = tmp_path_factory.mktemp("ck") / "digits.safetensors"
    torch.manual_seed(0)
    ibnify.save(ibnify.convert(DIGITS, model_kwargs={"width": 4}), path)
    return path


def _folder(root: Path, size: int, per_class: int = 4) -> Path:
    """An ImageFolder of two classes, ``per_class`` random ``size``-px images each."""
    generator = torch.Generator().manual_seed(size)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{index}.png")
    return root


def _params(command: str) -> dict:
    return {p.name: p for p in cli.commands[command].params}


def test_cli_choices_and_defaults_are_the_constants() -> None:
    """One source: the CLI's choice lists ARE the constants objects, the library's names are
    the same objects, and FinetuneConfig's and finetune's defaults are FINETUNE_DEFAULTS."""
    import ibnify.data.sources as sources
    import ibnify.deploy.engines as engines
    import ibnify.deploy.export as export
    import ibnify.deploy.fold as fold

    expected = {
        ("export", "profile"): constants.PROFILES,
        ("export", "fold_form"): constants.FOLD_FORMS,
        ("verify", "engine"): constants.ENGINES,
        ("bench", "engine"): constants.ENGINES,
        ("finetune", "dataset"): constants.BUILTIN_DATASETS,
        ("analyze", "dataset"): constants.BUILTIN_DATASETS,
        ("finetune", "optimizer"): constants.OPTIMIZERS,
    }
    for (command, option), value in expected.items():
        assert _params(command)[option].type.choices is value, (command, option)
    assert export.PROFILES is constants.PROFILES
    assert fold.FOLD_FORMS is constants.FOLD_FORMS and export.FOLD_FORMS is constants.FOLD_FORMS
    assert engines.ENGINES is constants.ENGINES
    assert sources.BUILTIN_DATASETS is constants.BUILTIN_DATASETS
    assert tuple(SHIFTS) == constants.SHIFT_NAMES
    config = FinetuneConfig()
    for name, value in constants.FINETUNE_DEFAULTS.items():
        assert getattr(config, name) == value, name
    options = _params("finetune")
    config_names = {f.name for f in fields(FinetuneConfig)}
    cli_defaults = {n: p.default for n, p in options.items() if n in constants.FINETUNE_DEFAULTS}
    assert len(cli_defaults) == 11 and set(cli_defaults) <= config_names
    assert all(constants.FINETUNE_DEFAULTS[n] == v for n, v in cli_defaults.items())
    # the trajectory options, listed once, are config fields; a resume checks them and workers
    assert set(TRAJECTORY_FIELDS) <= config_names and len(TRAJECTORY_FIELDS) == 12
    assert {"workers", "out_dir", "quiet", "device"}.isdisjoint(TRAJECTORY_FIELDS)
    other = FinetuneConfig(lr=0.07, warmup_epochs=0.5, workers=2, quiet=True)
    kept = resume_options(other, {"processes": 1})
    assert list(kept) == [*TRAJECTORY_FIELDS, "workers", "processes"]
    assert (kept["lr"], kept["warmup_epochs"], kept["workers"]) == (0.07, 0.5, 2)


def test_help_loads_no_torch() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from ibnify.cli import cli\n"
        "for c in ['finetune', 'export', 'analyze']:\n"
        "    assert CliRunner().invoke(cli, [c, '--help']).exit_code == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_bare_ibnify_prints_help_as_help() -> None:
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ibnify [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in result.stdout and "  finetune " in result.stdout
    assert "error:" not in result.output


def test_export_options_are_checked_before_anything_loads(tmp_path, digits_checkpoint) -> None:
    """A bad opset or output suffix is one line even for a missing checkpoint: nothing loads,
    torch's exporter never runs (it would print its IR first), nothing is written."""
    missing = str(tmp_path / "missing.safetensors")
    onnx_out = str(tmp_path / "m.onnx")
    opset_message = "opset 30 is outside the range ibnify exports (17 to 20"
    cases = {
        "opset 30": ([missing, "-o", onnx_out, "--opset", "30"], opset_message),
        "opset 16": ([missing, "-o", onnx_out, "--opset", "16"], "opset 16 is outside the range"),
        "safetensors name": (
            [str(digits_checkpoint), "-o", str(tmp_path / "m.safetensors")],
            f"output '{tmp_path / 'm.safetensors'}' does not end in .onnx; this command writes "
            f".onnx files, e.g. '{tmp_path / 'm.onnx'}'",
        ),
    }
    check_bad_inputs({}, cases, lambda _name, args: ["export", *args])
    assert "17 to 20" in _params("export")["opset"].help
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_analyze_data_options_end_in_one_line(tmp_path) -> None:
    folder = _folder(tmp_path / "day", 16, per_class=2)
    cases = {
        "one domain": ([DIGITS, "--domain-a", folder], "give both --domain-a DIR and --domain-b"),
        "domain and data": (
            [DIGITS, "--domain-a", folder, "--domain-b", folder, "--dataset", "digits"],
            "give --domain-a/--domain-b or --data/--dataset, not both",
        ),
        "plot suffix": (
            [DIGITS, "--dataset", "digits", "--plot", tmp_path / "d.pdf"],
            "does not end in .png",
        ),
    }
    check_bad_inputs({}, cases, lambda _name, args: ["analyze", *map(str, args)])


def test_ctrl_c_says_what_was_kept_and_resume_continues(
    tmp_path, digits_checkpoint, monkeypatch
) -> None:
    """Ctrl-C in epoch 2: one line naming the kept epoch 1 and the exact resume command, which
    then runs epoch 2 only (as JSON with --json), with --threads applied."""
    out = tmp_path / "run"
    args = [
        "finetune",
        str(digits_checkpoint),
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--out",
        str(out),
        "--force",
    ]
    real_epoch = loop._train_epoch

    def interrupted_in_epoch_2(training, loader, runtime, config, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(training, loader, runtime, config, epoch)

    monkeypatch.setattr(loop, "_train_epoch", interrupted_in_epoch_2)
    threads = torch.get_num_threads()
    stopped = CliRunner().invoke(cli, args)
    assert stopped.exit_code == 130, stopped.output
    assert torch.get_num_threads() == threads  # no --threads: torch's own setting stays
    lines = stopped.stdout.splitlines()
    assert len(lines) == 1 and EPOCH_LINE.match(lines[0]) and lines[0].startswith("epoch 1/2")
    resume = " ".join(a for a in args if a != "--force") + " --resume"
    assert stopped.stderr.splitlines() == [
        f"error: interrupted in epoch 2/2; kept epoch 1 in {out}/ (checkpoint.pt, "
        f"metrics.jsonl, model.safetensors); continue with: ibnify {resume}"
    ]
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    try:
        resumed = CliRunner().invoke(cli, [*resume.split(), "--json", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert resumed.exit_code == 0, resumed.output
    printed = resumed.stdout.splitlines()
    assert [json.loads(printed[0])["epoch"], printed[1:]] == [
        2,
        [f"finished: wrote {out / 'model.safetensors'}"],
    ]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_interrupt_before_any_epoch_says_nothing_was_written(
    tmp_path, digits_checkpoint, monkeypatch
) -> None:
    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_train_epoch", interrupted)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["finetune", str(digits_checkpoint), "--dataset", "digits", "--out", str(out)]
    )
    assert result.exit_code == 130
    assert result.stderr.splitlines() == [
        "error: interrupted in epoch 1/5, before any epoch finished; nothing was written"
    ]
    assert not (out / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def small_r18(tmp_path_factory) -> Path:
    """torchvision resnet18 converted for 32-px images, and a folder of 32-px images."""
    root = tmp_path_factory.mktemp("r18")
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            "resnet18",
            "--input-size",
            "32",
            "--num-classes",
            "2",
            "--seed",
            "0",
            "-o",
            str(root / "r18.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    _folder(root / "images", 32)
    return root


def _sizes_seen(monkeypatch) -> list[tuple[int, ...]]:
    """Image sizes reaching the model in finetune (per step) and analyze (per collected set)."""
    seen: list[tuple[int, ...]] = []
    real_step, real_collect = loop._step, divergence._collect

    def step(training, runtime, config, images, labels):
        seen.append(tuple(images.shape[1:]))
        return real_step(training, runtime, config, images, labels)

    def collect(model, data, *args):
        seen.append(tuple(data.dataset[0][0].shape))
        return real_collect(model, data, *args)

    monkeypatch.setattr(loop, "_step", step)
    monkeypatch.setattr(divergence, "_collect", collect)
    return seen


@pytest.mark.parametrize("given", [["--input-size", "32"], []], ids=["given", "recorded"])
def test_finetune_and_analyze_feed_the_input_size(small_r18, monkeypatch, given) -> None:
    """32-px images reach a model converted at 32 px at 32 px, not upsampled to 224."""
    checkpoint = str(small_r18 / "r18.safetensors")
    # format 2 records the input size: a checkpoint without it would make this test vacuous
    assert ibnify.read_recipe(checkpoint).input_size == (3, 32, 32)
    seen = _sizes_seen(monkeypatch)
    images = str(small_r18 / "images")
    tuned = CliRunner().invoke(
        cli,
        [
            "finetune",
            checkpoint,
            "--data",
            images,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(small_r18 / f"run-{len(given)}"),
            "--force",
            *given,
            "--quiet",
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    analyzed = CliRunner().invoke(
        cli,
        [
            "analyze",
            checkpoint,
            "--data",
            images,
            "--shift",
            "brightness_down",
            "--images",
            "8",
            "--json",
            *given,
        ],
    )
    assert analyzed.exit_code == 0, analyzed.output
    assert set(seen) == {(3, 32, 32)} and len(seen) == 3  # two steps, one collected set


def test_python_api_takes_folder_paths_and_cli_text(small_r18, monkeypatch) -> None:
    """Folder paths where the CLI takes --data (read at the model's recorded 32 px), a typed
    error naming what is accepted otherwise, CLI text for stages and ratio, matching names."""
    images = str(small_r18 / "images")
    model = ibnify.load(small_r18 / "r18.safetensors")
    seen = _sizes_seen(monkeypatch)
    result = ibnify.finetune(model, images, epochs=1, batch_size=4, quiet=True)
    assert [h["images"] for h in result.history] == [8]
    report = ibnify.analyze(model, images, images, images=8, progress=False)
    assert report.domain_a == report.domain_b == "images" and report.images == 8
    assert all(site.divergence < 1e-6 for site in report.sites)  # the same images twice
    assert seen == [(3, 32, 32)] * 4  # two steps, then domains A and B
    with pytest.raises(DataError, match=r"^data is a list; give an image folder path, 'digits'"):
        ibnify.finetune(model, [1, 2], epochs=1)
    assert ibnify.analyze is divergence.analyze_divergence
    assert ibnify.analyze_graph is graph.analyze
    plan = ibnify.plan("resnet18", stages="1-2", ratio="0.25", input_size=32)
    assert (plan.stages, plan.ratio, len(plan.sites)) == ((1, 2), 0.25, 4)
    with pytest.raises(ibnify.IbnifyError, match=r"^ratio 'half' is not a number"):
        ibnify.plan("resnet18", ratio="half", input_size=32)
