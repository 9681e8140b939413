"""`ibnify adapt` / `ibnify.adapt`: BN statistics re-estimated on target images (AdaBN).

Tiny models and a few dozen images: the assertions are about what changes (norm buffers only,
by the hand-computed cumulative mean and variance), what must not (parameters, the input model,
the source file) and that the adapted model still folds and exports.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.ops.misc import FrozenBatchNorm2d

import ibnify
from ibnify.adaptation import (
    DEFAULT_LR,
    METHODS,
    NORM_CHOICES,
    AdaptOptions,
    adapt_file,
    adaptable_norms,
    adaptations,
)
from ibnify.cli import cli
from ibnify.cli.adapt import METHOD_CHOICES, NORMS_CHOICES, adapt_command
from ibnify.data.digits import load_digits_images
from ibnify.data.images import ImageData
from ibnify.errors import InvalidOptionError
from ibnify.models.registry import build_model
from tests.cli_process import check_bad_inputs
from tests.helpers import ResidualBlock, randomize_norms

SOURCE = "ibnify:digits_resnet"
KWARGS = {"width": 4}


def _images(count: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _data(x: torch.Tensor) -> ImageData:
    labels = torch.zeros(len(x), dtype=torch.long)
    return ImageData(TensorDataset(x, labels), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), labelled=False)


def _tiny(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        norm(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3),
        norm(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    with torch.no_grad():  # non-trivial affine: a bug that resets it to 1 and 0 shows
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d):
                module.running_mean.copy_(torch.rand(4) - 0.5)
                module.running_var.copy_(0.5 + torch.rand(4))
                module.weight.copy_(0.5 + torch.rand(4))
                module.bias.copy_(torch.rand(4) - 0.5)
    return model


def _hand_statistics(x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over batches of the batch mean and unbiased batch variance (``momentum=None``)."""
    means, variances = [], []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].double()
        means.append(batch.mean(dim=(0, 2, 3)))
        variances.append(batch.transpose(0, 1).reshape(batch.shape[1], -1).var(dim=1))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_only_norm_buffers_change_and_the_input_stays() -> None:
    model = _tiny()
    model.train()
    before = copy.deepcopy(model.state_dict())
    adapted = ibnify.adapt(model, _data(_images()), batch_size=4)
    for key, value in model.state_dict().items():  # the caller's model: untouched
        assert torch.equal(value, before[key]), key
    assert model.training and adapted.training
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"1.running_mean", "1.running_var", "5.running_mean", "5.running_var"}
    assert [adapted[i].momentum for i in (1, 5)] == [model[i].momentum for i in (1, 5)] == [0.1] * 2
    for name, parameter in adapted.named_parameters():
        assert torch.equal(parameter, dict(model.named_parameters())[name]), name


def test_statistics_equal_the_hand_computed_cumulative_mean_and_variance() -> None:
    model, x = _tiny(), _images(10)
    adapted = ibnify.adapt(model, _data(x), batch_size=4)  # batches of 4, 4, 2
    with torch.no_grad():
        mean, var = _hand_statistics(model[0](x), 4)
    torch.testing.assert_close(adapted[1].running_mean.double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapted[1].running_var.double(), var, rtol=0, atol=1e-6)
    # the whole network: what torch's own train-mode BN with momentum=None records, dropout off
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
            module.train()
        elif isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        for start in range(0, 10, 4):
            reference(x[start : start + 4])
    for index in (1, 5):
        torch.testing.assert_close(
            adapted[index].running_mean, reference[index].running_mean, rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            adapted[index].running_var, reference[index].running_var, rtol=0, atol=1e-6
        )


def test_images_limit_and_prior() -> None:
    model, x = _tiny(), _images(12)
    same = ibnify.adapt(model, _data(x), prior=1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    target = ibnify.adapt(model, _data(x), prior=0.0, batch_size=64)
    mixed = ibnify.adapt(model, _data(x), prior=0.25, batch_size=64)
    expected = 0.25 * model[1].running_mean + 0.75 * target[1].running_mean
    torch.testing.assert_close(mixed[1].running_mean, expected, rtol=0, atol=1e-6)
    few = ibnify.adapt(model, _data(x), images=5, seed=3, batch_size=64)
    chosen = torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5].sort().values
    with torch.no_grad():
        mean, _var = _hand_statistics(model[0](x[chosen]), 64)
    torch.testing.assert_close(few[1].running_mean.double(), mean, rtol=0, atol=1e-6)
    for bad in (2, -0.1, "half"):
        with pytest.raises(InvalidOptionError, match="prior must be"):
            ibnify.adapt(model, _data(x), prior=bad)
    with pytest.raises(InvalidOptionError, match="images must be"):
        AdaptOptions(images=0)


class _WithSpare(nn.Module):
    """The tiny model plus a BN its forward never reaches (a head kept for another task)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _tiny()
        self.spare = nn.BatchNorm2d(4)
        randomize_norms(self.spare)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("prior", [0.0, 0.5])
def test_a_norm_the_forward_never_reaches_keeps_its_statistics(prior: float) -> None:
    model = _WithSpare()
    adapted = ibnify.adapt(model, _data(_images(8)), prior=prior, batch_size=4)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(adapted.spare, key), getattr(model.spare, key)), key
    assert not torch.equal(adapted.body[1].running_mean, model.body[1].running_mean)


def test_frozen_batchnorm_adapts_its_buffers() -> None:
    model, x = _tiny(FrozenBatchNorm2d), _images(9)
    assert set(adaptable_norms(model)) == {"1", "5"}
    adapted = ibnify.adapt(model, _data(x), batch_size=3)
    with torch.no_grad():
        mean, var = _hand_statistics(model[0](x), 3)
    torch.testing.assert_close(adapted[1].running_mean.double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapted[1].running_var.double(), var, rtol=0, atol=1e-6)
    assert torch.equal(adapted[1].weight, model[1].weight)  # the affine buffers stay
    assert torch.equal(adapted[1].bias, model[1].bias)
    assert not torch.equal(adapted[5].running_mean, model[5].running_mean)


def test_adapted_ibn_model_records_the_adaptation_exports_and_verifies(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base, source = build_model(SOURCE, **KWARGS)
    converted = randomize_norms(
        ibnify.convert(base, stages=(1, 2), arch=source, model_kwargs=KWARGS)
    )
    x = _images(16).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 16×16
    adapted = ibnify.adapt(converted, _data(x), images=12, prior=0.5)
    ibn = adapted.layer1[0].bn1
    assert not torch.equal(ibn.BN.running_mean, converted.layer1[0].bn1.BN.running_mean)
    assert ibn.IN.running_mean is None  # the IN half carries no statistics
    assert adaptations(adapted) == [
        {"kind": "adabn", "data": "", "images": 12, "prior": 0.5, "batch_size": 64, "seed": 0}
    ]
    assert adaptations(converted) == []
    path = ibnify.save(adapted, tmp_path / "adapted.safetensors")
    assert ibnify.read_recipe(path).adaptations == tuple(adaptations(adapted))
    loaded = ibnify.load(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x[:2]), adapted.eval()(x[:2]))
    report = ibnify.export_onnx(adapted, tmp_path / "adapted.onnx", input_size=(3, 16, 16))
    plain = ibnify.export_onnx(converted, tmp_path / "plain.onnx", input_size=(3, 16, 16))
    assert len(report.fold.folded) == len(plain.fold.folded) >= 2  # the BN halves still fold
    assert report.fold.unfolded == plain.fold.unfolded
    assert ibnify.verify_onnx(tmp_path / "adapted.onnx", adapted).passed


def _digit_folder(root: Path, count: int, labelled: bool) -> Path:
    """``count`` test digits with inverted colours, as PNG files (with or without classes)."""
    _tx, _ty, x, y = load_digits_images()
    for index in range(count):
        folder = root / str(int(y[index])) if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (1 - x[index]).mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base, source = build_model(SOURCE, **KWARGS)
    converted = ibnify.convert(base, stages=(1,), arch=source, model_kwargs=KWARGS)
    return ibnify.save(converted, tmp_path_factory.mktemp("adapt") / "ibn.safetensors")


def test_cli_adapt_writes_a_new_file_and_a_before_after_table(checkpoint, tmp_path) -> None:
    target = _digit_folder(tmp_path / "target", 60, labelled=True)
    source_bytes = checkpoint.read_bytes()
    out = tmp_path / "adapted.safetensors"
    args = ["adapt", str(checkpoint), "--data", str(target), "-o", str(out), "--images", "50"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"adapted the BN statistics on 50 images of {target} (prior 0)"
    assert lines[2].split("|")[2:4] == [" before ", " after "]
    assert lines[4].startswith("| clean ") and lines[-1] == f"wrote {out}"
    assert checkpoint.read_bytes() == source_bytes
    expected = ibnify.adapt(ibnify.load(checkpoint), str(target), images=50)
    loaded = ibnify.load(out)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert ibnify.read_recipe(out).adaptations[0]["images"] == 50


def test_cli_adapt_bad_inputs_end_in_one_error_line(checkpoint, tmp_path) -> None:
    unlabelled = _digit_folder(tmp_path / "plain", 8, labelled=False)
    (tmp_path / "empty").mkdir()
    cases = {
        "prior 2": (["--data", str(unlabelled), "--prior", "2"], "prior must be between 0 and 1"),
        "empty folder": (["--data", str(tmp_path / "empty")], "holds no images"),
        "onnx name": (["--data", str(unlabelled), "-o", str(tmp_path / "x.onnx")], ".safetensors"),
        "same file": (["--data", str(unlabelled), "-o", str(checkpoint), "--force"], "source"),
    }
    before = sorted(tmp_path.rglob("*"))
    source_bytes = checkpoint.read_bytes()

    def argv(name: str, args: list[str]) -> list[str]:
        output = (
            [] if "-o" in args else ["-o", str(tmp_path / f"{name.replace(' ', '-')}.safetensors")]
        )
        return ["adapt", str(checkpoint), *args, *output]

    check_bad_inputs({}, cases, argv)
    assert sorted(tmp_path.rglob("*")) == before
    assert checkpoint.read_bytes() == source_bytes


def test_cli_adapt_entropy_writes_what_python_computes_and_a_source_check(
    checkpoint, tmp_path
) -> None:
    target = _digit_folder(tmp_path / "target", 60, labelled=True)
    source = _digit_folder(tmp_path / "source", 60, labelled=True)  # small: the test stays fast
    source_bytes = checkpoint.read_bytes()
    out = tmp_path / "entropy.safetensors"
    args = [
        "adapt",
        str(checkpoint),
        "--data",
        str(target),
        "-o",
        str(out),
        "--method",
        "entropy",
        "--norms",
        "bn",
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--batch-size",
        "16",
        "--source",
        str(source),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    record = ibnify.read_recipe(out).adaptations[-1]
    assert lines[0] == (
        f"adapted the BN affine by entropy minimisation on 60 images of {target} "
        f"(2 epochs, {record['updates']} updates, {record['kept']} of 120 samples under the "
        "entropy margin), then the BN statistics (prior 0)"
    )
    assert lines[1] == "accuracy % on the source and target data, before and after:"
    assert [cell.strip() for cell in lines[2].split("|")[2:4]] == ["before", "after"]
    assert lines[4].startswith("| clean ") and lines[5].startswith("| domain target ")
    assert lines[-1] == f"wrote {out}"
    assert (record["kind"], record["norms"], record["epochs"], record["lr"]) == (
        "entropy",
        "bn",
        2,
        0.05,
    )
    assert checkpoint.read_bytes() == source_bytes
    expected = ibnify.adapt(
        ibnify.load(checkpoint),
        str(target),
        method="entropy",
        norms="bn",
        epochs=2,
        lr=0.05,
        batch_size=16,
    )
    loaded = ibnify.load(out)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_cli_choices_are_the_library_constants() -> None:
    assert (METHOD_CHOICES, NORMS_CHOICES) == (METHODS, NORM_CHOICES)
    lr = next(p for p in adapt_command.params if p.name == "lr")
    assert f"(default {DEFAULT_LR:g})" in lr.help


def test_cli_adapt_entropy_bad_inputs_end_in_one_error_line(checkpoint, tmp_path) -> None:
    unlabelled = _digit_folder(tmp_path / "plain", 8, labelled=False)
    (tmp_path / "empty").mkdir()
    entropy = ["--method", "entropy"]
    cases = {
        "lr 0": (["--data", str(unlabelled), *entropy, "--lr", "0"], "lr must be a positive"),
        "lr -1": (["--data", str(unlabelled), *entropy, "--lr", "-1"], "lr must be a positive"),
        "epochs 0": (["--data", str(unlabelled), *entropy, "--epochs", "0"], "epochs must be"),
        "steps 0": (["--data", str(unlabelled), *entropy, "--steps", "0"], "steps must be"),
        "lr with bn": (
            ["--data", str(unlabelled), "--lr", "0.1"],
            "--lr applies to --method entropy",
        ),
        "norms with bn": (["--data", str(unlabelled), "--norms", "in"], "add --method entropy"),
        "empty folder": (["--data", str(tmp_path / "empty"), *entropy], "holds no images"),
        "unlabelled source": (
            ["--data", str(unlabelled), *entropy, "--source", str(unlabelled)],
            "the source data 'plain' has no labels",
        ),
    }
    before = sorted(tmp_path.rglob("*"))
    source_bytes = checkpoint.read_bytes()

    def argv(name: str, args: list[str]) -> list[str]:
        return [
            "adapt",
            str(checkpoint),
            *args,
            "-o",
            str(tmp_path / f"{name.replace(' ', '-')}.safetensors"),
        ]

    check_bad_inputs({}, cases, argv)
    assert sorted(tmp_path.rglob("*")) == before
    assert checkpoint.read_bytes() == source_bytes


class OwnNet(nn.Module):
    """A class no registry knows: a stem, two residual stages, a 10-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block1 = ResidualBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.block2 = ResidualBlock(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(torch.relu(self.down(self.block1(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def test_own_model_class_adapts_in_python_and_from_files(tmp_path) -> None:
    torch.manual_seed(0)
    converted = randomize_norms(ibnify.convert(OwnNet(), input_size=(3, 16, 16)))
    assert any(isinstance(m, nn.InstanceNorm2d) for m in converted.modules())
    state = copy.deepcopy(converted.state_dict())
    x = _images(12).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    for method in ("bn", "entropy"):
        adapted = ibnify.adapt(converted, _data(x), method=method, batch_size=4)
        assert adaptations(adapted)[-1]["kind"] == ("adabn" if method == "bn" else "entropy")
        assert all(torch.equal(v, state[k]) for k, v in converted.state_dict().items())
    path = ibnify.save(converted, tmp_path / "own.safetensors")
    target = _digit_folder(tmp_path / "target", 12, labelled=False)
    out = tmp_path / "own-adapted.safetensors"
    listing, source_bytes = sorted(tmp_path.rglob("*")), path.read_bytes()
    result = CliRunner().invoke(
        cli, ["adapt", str(path), "--data", str(target), "-o", str(out), "--method", "entropy"]
    )
    lines = result.output.splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "OwnNet" in lines[0] and "base=OwnNet(...)" in lines[0] and "adapt_file" in lines[0]
    with pytest.raises(ibnify.IbnifyError, match=r"adapt_file\(path, data, output, base=OwnNet"):
        adapt_file(path, target, out, AdaptOptions(method="entropy"))
    assert sorted(tmp_path.rglob("*")) == listing  # refused before any work: nothing written
    options = AdaptOptions(method="entropy", lr=0.05, batch_size=4)
    done = adapt_file(path, target, out, options, base=OwnNet())
    assert path.read_bytes() == source_bytes
    loaded = ibnify.load(out, base=OwnNet())
    assert all(torch.equal(v, done.model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert ibnify.read_recipe(out).adaptations[-1]["kind"] == "entropy"
    expected = ibnify.adapt(
        ibnify.load(path, base=OwnNet()), str(target), method="entropy", lr=0.05, batch_size=4
    )
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_source_check_names_a_target_whose_folder_name_is_taken(checkpoint, tmp_path) -> None:
    target = _digit_folder(tmp_path / "noise", 60, labelled=True)  # "noise" is a shift's name
    done = adapt_file(checkpoint, target, tmp_path / "a.safetensors", source="digits")
    assert done.report is not None and done.report.domains == ["target"]
    assert done.report.shifts == ["clean"] and done.report.models == ["before", "after"]
