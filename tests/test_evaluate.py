"""Evaluation: each shift is deterministic and does what its name says; report, plot, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import ibnify
from ibnify.cli import cli
from ibnify.data.digits import load_digits_images
from ibnify.data.images import ImageData, Normalize
from ibnify.data.shifts import SHIFTS, apply_shift, parse_shifts
from ibnify.evaluation import RobustnessReport, evaluate
from ibnify.models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Real digits images (values in (0, 1), never 0 or 1) plus random images."""
    digits = load_digits_images()[2][:16]
    noise = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    return torch.cat([digits, noise])


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(dim=1)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_each_shift_is_deterministic_changes_the_input_and_stays_in_range(
    name: str, images: torch.Tensor
) -> None:
    original = images.clone()
    first = apply_shift(name, images, seed=0, batch_index=3)
    second = apply_shift(name, images, seed=0, batch_index=3)
    assert torch.equal(first, second)
    assert torch.equal(images, original), "a shift must not modify its input in place"
    assert first.shape == images.shape
    assert (first - images).abs().max() > 0.02
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_brightness_shifts_move_the_mean_as_named(images: torch.Tensor) -> None:
    mean = images.mean(dim=(1, 2, 3))
    assert (apply_shift("brightness_down", images).mean(dim=(1, 2, 3)) < mean - 0.05).all()
    assert (apply_shift("brightness_up", images).mean(dim=(1, 2, 3)) > mean + 0.05).all()
    assert (apply_shift("gamma", images).mean(dim=(1, 2, 3)) < mean).all()


def test_contrast_shifts_change_the_spread_not_the_mean(images: torch.Tensor) -> None:
    low = apply_shift("contrast_down", images)
    high = apply_shift("contrast_up", images)
    assert torch.allclose(_std(low), 0.5 * _std(images), rtol=1e-4)
    assert (_std(high) > 1.2 * _std(images)).all()
    assert torch.allclose(low.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=1e-6)


def test_colour_offsets_follow_the_paper(images: torch.Tensor) -> None:
    red = apply_shift("r_plus_50", images)
    assert torch.equal(red[:, 1:], images[:, 1:]), "R+50 must leave green and blue alone"
    unclipped = images[:, 0] <= 1 - 50 / 255
    assert torch.allclose((red[:, 0] - images[:, 0])[unclipped], torch.tensor(50 / 255))
    rgb = apply_shift("rgb_plus_50", images)
    unclipped = images <= 1 - 50 / 255
    assert torch.allclose((rgb - images)[unclipped], torch.tensor(50 / 255))


def test_blur_smooths_and_noise_depends_on_the_seed(images: torch.Tensor) -> None:
    def roughness(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
            x[..., 1:] - x[..., :-1]
        ).abs().mean()

    blurred = apply_shift("blur", images)
    assert roughness(blurred) < 0.7 * roughness(images)
    assert torch.allclose(blurred.mean(), images.mean(), atol=0.01)
    noisy = apply_shift("noise", images, seed=0)
    assert not torch.equal(noisy, apply_shift("noise", images, seed=1))
    assert not torch.equal(noisy, apply_shift("noise", images, seed=0, batch_index=1))
    assert 0.05 < (noisy - images).std() < 0.1


def test_parse_shifts_groups_all_and_errors() -> None:
    assert parse_shifts("all") == tuple(SHIFTS)
    assert parse_shifts("brightness,R+50") == ("brightness_up", "brightness_down", "r_plus_50")
    assert parse_shifts("contrast-down, contrast") == ("contrast_down", "contrast_up")
    with pytest.raises(ibnify.IbnifyError, match=r"unknown shift 'sepia'.*brightness"):
        parse_shifts("sepia")


class _MeanClassifier(nn.Module):
    """Predicts class 1 when the normalised image mean is positive, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3)) * self.scale
        return torch.stack([-mean, mean], dim=1)


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2)


def _bright_dark_data() -> ImageData:
    # 10 bright images labelled 1, 10 dark images labelled 0; normalised around 0.5.
    bright = torch.full((10, 3, 4, 4), 0.8)
    dark = torch.full((10, 3, 4, 4), 0.3)
    labels = torch.tensor([1] * 10 + [0] * 10)
    return ImageData(TensorDataset(torch.cat([bright, dark]), labels), (0.5,) * 3, (0.2,) * 3)


def test_evaluate_counts_correctly_and_builds_the_table() -> None:
    mean_model, constant = _MeanClassifier().train(), _Constant()
    report = evaluate(
        {"mean": mean_model, "const": constant},
        _bright_dark_data(),
        shifts="brightness_down,rgb_plus_50",
        batch_size=7,
    )
    assert mean_model.training, "evaluate must restore train mode"
    assert report.images == 20
    assert report.shifts == ["clean", "brightness_down", "rgb_plus_50"]
    # Clean: all right. ×0.5: bright 0.8 → 0.4 (< 0.5: predicted dark), so 10 of 20 right.
    # +50/255: dark 0.3 → 0.496 (still dark): all right.
    assert report.accuracy["mean"] == {"clean": 1.0, "brightness_down": 0.5, "rgb_plus_50": 1.0}
    assert report.accuracy["const"] == {"clean": 0.5, "brightness_down": 0.5, "rgb_plus_50": 0.5}
    assert report.drop("mean", "brightness_down") == pytest.approx(0.5)
    assert report.mean_drop("mean") == pytest.approx(0.25)
    table = report.table().splitlines()
    assert [cell.strip() for cell in table[0].split("|")[1:-1]] == ["shift", "mean", "const"]
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert "100.0" in rows["clean"] and "50.0 (-50.0)" in rows["brightness_down"]
    assert "-25.0" in rows["mean drop"]
    data = json.loads(report.to_json())
    assert data["drop"]["mean"]["brightness_down"] == pytest.approx(0.5)
    assert "RGB+50" in data["descriptions"]["rgb_plus_50"]


def _near_threshold_data(count: int = 40) -> tuple[torch.Tensor, torch.Tensor, ImageData]:
    """Constant images a hair above or below 0.5 (label: which side): the noise shift flips
    some of them, which ones depending on its seed."""
    offsets = torch.linspace(-0.012, 0.012, count + 1)
    offsets = offsets[offsets != 0][:count]
    images = (0.5 + offsets).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    labels = (offsets > 0).long()
    data = ImageData(TensorDataset(images, labels), (0.5,) * 3, (0.2,) * 3, num_classes=2)
    return images, labels, data


def _reference_noise_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int
) -> float:
    """The noise accuracy by hand: batch i shifted with (seed, i), normalised, classified."""
    normalize = Normalize((0.5,) * 3, (0.2,) * 3)
    right = 0
    for index, start in enumerate(range(0, len(images), batch)):
        shifted = apply_shift("noise", images[start : start + batch], seed=seed, batch_index=index)
        with torch.no_grad():
            predicted = model(normalize(shifted)).argmax(1)
        right += int((predicted == labels[start : start + batch]).sum())
    return right / len(images)


def test_the_noise_seed_and_each_domains_own_image_count_reach_the_report() -> None:
    """The noise shift uses the ``seed`` given (two seeds, two hand-computed accuracies that
    differ) and a domain's accuracy is over its own images (4 of 6), not the main data's."""
    images, labels, data = _near_threshold_data()
    model = _MeanClassifier()
    bright = torch.full((6, 3, 4, 4), 0.8)
    domain = ImageData(
        TensorDataset(bright, torch.tensor([1, 1, 1, 1, 0, 0])), (0.5,) * 3, (0.2,) * 3, 2
    )
    found = {}
    for seed in (3, 4):
        report = evaluate(
            model, data, shifts="noise", batch_size=7, seed=seed, domains={"bright": domain}
        )
        found[seed] = report.accuracy["model"]["noise"]
        assert found[seed] == _reference_noise_accuracy(model, images, labels, 7, seed)
        assert report.accuracy["model"]["clean"] == 1.0
        assert report.accuracy["model"]["bright"] == pytest.approx(4 / 6, abs=1e-12)
        assert report.images == 40 and report.domain_images == {"bright": 6}
    assert found[3] != found[4] and max(found.values()) < 1.0


def test_plot_writes_a_png_without_changing_the_backend(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    report = RobustnessReport(
        ["a", "b"],
        ["clean", "blur"],
        {"a": {"clean": 0.9, "blur": 0.5}, "b": {"clean": 0.8, "blur": 0.7}},
    )
    path = report.plot(tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    assert matplotlib.get_backend() == backend
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_evaluate_two_checkpoints_side_by_side(tmp_path: Path) -> None:
    paths = []
    for seed, name in ((0, "first"), (1, "second")):
        torch.manual_seed(seed)
        model, source = build_model("ibnify:digits_resnet", width=4)
        converted = ibnify.convert(model, stages=(1,), arch=source, model_kwargs={"width": 4})
        paths.append(tmp_path / f"{name}.safetensors")
        ibnify.save(converted, paths[-1])
    runner = CliRunner()
    args = ["evaluate", *map(str, paths), "--dataset", "digits", "--shift", "brightness"]
    plot = tmp_path / "plot.png"
    result = runner.invoke(cli, [*args, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("| shift"))
    assert "first" in header and "second" in header
    assert "brightness_down" in result.output and plot.is_file()
    again = runner.invoke(cli, [*args, "--plot", str(plot)])
    assert again.exit_code == 1 and again.output.startswith("error:") and "--force" in again.output
    as_json = runner.invoke(cli, [*args, "--json"])
    data = json.loads(as_json.output)
    assert data["models"] == ["first", "second"] and data["images"] == 599
    assert set(data["accuracy"]["first"]) == {"clean", "brightness_up", "brightness_down"}
    bad = runner.invoke(cli, [*args[:-1], "sepia"])
    assert bad.exit_code == 1 and "unknown shift" in bad.output
