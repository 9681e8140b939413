"""A user's whole chain on the command line: convert at their image size and class count, add a
layout to the checkpoint, fine-tune, evaluate on a target domain, adapt, analyze, export,
verify. Every step reads the size and the plans the checkpoint records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import ibnify
from ibnify.cli import cli
from ibnify.data.digits import load_digits_images
from ibnify.data.sources import resolve_data_source
from ibnify.errors import InvalidOptionError
from ibnify.models import build_model


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)
    return result.output


def _printed_folder(root: Path, count: int = 60) -> Path:
    """``count`` test digits, inverted (a colour shift), as 32×32 PNGs in CLASS folders."""
    _tx, _ty, images, labels = load_digits_images(size=32)
    for index in range(count):
        folder = root / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (1 - images[index]).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


def test_the_digits_set_follows_the_input_size() -> None:
    model = torch.nn.Conv2d(3, 3, 1)
    data = resolve_data_source(None, "digits", model, split="test", input_size=(3, 32, 32))
    assert tuple(data.dataset[0][0].shape) == (3, 32, 32)
    default = resolve_data_source(None, "digits", model, split="test")
    assert tuple(default.dataset[0][0].shape) == (3, 16, 16)
    with pytest.raises(InvalidOptionError, match="the digits set is square RGB"):
        resolve_data_source(None, "digits", model, split="test", input_size=(3, 32, 48))


def test_cli_chain_convert_stack_finetune_evaluate_adapt_analyze_export_verify(tmp_path) -> None:
    """resnet18 for 10 classes at 32 px, IBN-a then IBN-b, through every command."""
    torch.manual_seed(0)
    first, both = tmp_path / "r18.safetensors", tmp_path / "r18b.safetensors"
    _invoke(["convert", "resnet18", "--input-size", "32", "--num-classes", "10", "-o", first])
    out = _invoke(["convert", first, "--layout", "b", "-o", both])
    assert "recipe: resnet-a stages 1,2,3 then resnet-b stages 1,2" in out
    # the digits set is read at the recorded 32 px (at 16 px layer3 would be 1×1 for IN)
    out = _invoke(
        [
            "finetune",
            both,
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--out",
            tmp_path / "run",
            "--threads",
            "2",
        ]
    )
    assert "epoch 1/1" in out and "finished: wrote" in out
    tuned = tmp_path / "run" / "model.safetensors"
    recipe = ibnify.read_recipe(tuned)
    assert [p.layout for p in recipe.plans] == ["resnet-a", "resnet-b"]
    assert recipe.input_size == (3, 32, 32) and recipe.num_classes == 10

    printed = _printed_folder(tmp_path / "printed")
    out = _invoke(["evaluate", tuned, "--dataset", "digits", "--domain", f"printed={printed}"])
    assert "| domain printed |" in out
    adapted = tmp_path / "adapted.safetensors"
    out = _invoke(["adapt", tuned, "--data", printed, "-o", adapted])
    assert "adapted the BN statistics on 60 images" in out
    assert ibnify.read_recipe(adapted).adaptations[0]["images"] == 60

    out = _invoke(
        [
            "analyze",
            tuned,
            "--dataset",
            "digits",
            "--domain",
            f"printed={printed}",
            "--images",
            "16",
        ]
    )
    marked = [line for line in out.splitlines() if "(converted)" in line]
    assert len(marked) == 6 + 3  # IBN-a's six bn1 sites and IBN-b's three, both plans marked

    onnx_file = tmp_path / "adapted.onnx"
    out = _invoke(["export", adapted, "-o", onnx_file])
    assert "input batchx3x32x32" in out  # the recorded size, not 224
    assert "PASS" in _invoke(["verify", onnx_file, "--against", adapted])


def test_an_unconverted_checkpoint_fine_tunes_to_a_model_file_with_no_plan(tmp_path) -> None:
    """The demo's control chain: save an unconverted model, fine-tune it with --out, and the run
    writes a model file (no plan) that loads to the trained weights and evaluates."""
    torch.manual_seed(0)
    base = ibnify.load(
        ibnify.save(
            build_model("ibnify:digits_resnet", width=4)[0],
            tmp_path / "control.safetensors",
            source="ibnify:digits_resnet",
            model_kwargs={"width": 4},
        )
    )
    run = tmp_path / "run"
    control = tmp_path / "control.safetensors"
    out = _invoke(["finetune", control, "--dataset", "digits", "--epochs", "1", "--out", run])
    assert "finished: wrote" in out
    tuned = run / "model.safetensors"
    recipe = ibnify.read_recipe(tuned)
    assert recipe.plans == () and recipe.source == "ibnify:digits_resnet"
    loaded = ibnify.load(tuned)
    assert list(loaded.state_dict()) == list(base.state_dict())
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not torch.equal(loaded.conv1.weight, base.conv1.weight)  # it did train
