"""Feature divergence per norm site (`ibnify analyze`, IBN-Net §3) on real digits.

A baseline trained for a few epochs on scikit-learn's digits shows the paper's finding: a
brightness shift moves the feature statistics of shallow layers far more than those of the last
stage, and IBN-a's IN halves remove most of that divergence at the sites they replace.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch.distributions import Normal, kl_divergence

import ibnify
from ibnify.cli import cli
from ibnify.commands.inputs import ModelRequest
from ibnify.core import apply_plan, get_plan, list_norm_layers
from ibnify.core.plans import ConversionPlan
from ibnify.data.digits import digits_data
from ibnify.models.small import digits_resnet
from ibnify.placement.divergence import analyze_divergence, gaussian_symmetric_kl
from ibnify.placement.divergence_report import CONTENT_FACTOR, suggest_stages
from ibnify.train.config import FinetuneConfig
from tests.cli_process import check_bad_inputs
from tests.helpers import bad_class_folders

SOURCE = "ibnify:digits_resnet"


def _tune(epochs: int, lr: float, seed: int) -> FinetuneConfig:
    return FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=64,
        weight_decay=5e-4,
        seed=seed,
        quiet=True,
        device="cpu",
    )


@pytest.fixture(scope="module")
def trained():
    """The demo's baseline, trained for 4 epochs on one thread (about 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = digits_resnet()
    ibnify.finetune(model, digits_data("train"), _tune(4, 0.1, 0))
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_data():
    return digits_data("test")


def test_symmetric_kl_is_the_gaussian_kl_both_ways() -> None:
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 1.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 4.0, 1.0])
    got = gaussian_symmetric_kl(mean_a, var_a, mean_b, var_b)
    a, b = Normal(mean_a, var_a.sqrt()), Normal(mean_b, var_b.sqrt())
    expected = kl_divergence(a, b) + kl_divergence(b, a)
    # the variance floor is 1e-5 × the mean variance: a relative change of about 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert got[1] == 0.0  # identical Gaussians
    constant = gaussian_symmetric_kl(torch.ones(2), torch.zeros(2), torch.ones(2), torch.zeros(2))
    assert constant.tolist() == [0.0, 0.0]  # e.g. an IN channel's mean is its beta everywhere


def test_self_divergence_is_zero_and_content_baseline_small(trained, test_data) -> None:
    same = analyze_divergence(trained, test_data, test_data, images=256, progress=False)
    assert [s.name for s in same.sites] == list_norm_layers(trained)
    assert max(s.divergence for s in same.sites) < 1e-9
    shifted = analyze_divergence(
        trained, test_data, shifts="brightness_down", images=256, progress=False
    )
    # same seed, same halves: the content baseline does not depend on domain B
    assert [s.content for s in same.sites] == [s.content for s in shifted.sites]
    assert max(s.content for s in same.sites) < 0.1
    assert shifted.stage_divergence[1] > 100 * shifted.stage_content[1]


def test_brightness_shift_diverges_more_in_stage_1_than_in_the_last(trained, test_data) -> None:
    report = analyze_divergence(
        trained, test_data, shifts="brightness_down", images=256, progress=False
    )
    stages = report.stage_divergence
    assert sorted(stages) == [0, 1, 2, 3]
    assert stages[1] > 3 * stages[3], stages
    assert report.shifts == ["brightness_down"] and report.images == 256
    assert report.suggested_stages == (1, 2)


def test_ibn_a_and_finetune_lower_divergence_at_converted_sites(trained, test_data) -> None:
    torch.set_num_threads(1)
    ibn = ibnify.convert(trained, stages=(1, 2), arch=SOURCE)
    control = copy.deepcopy(trained)
    train = digits_data("train")
    ibnify.finetune(ibn, train, _tune(2, 0.02, 1))
    ibnify.finetune(control, train, _tune(2, 0.02, 1))
    sites = [s.name for s in get_plan(ibn).sites]
    assert sites == ["layer1.0.bn1", "layer2.0.bn1"]

    def at_sites(model) -> dict[str, float]:
        report = analyze_divergence(model, test_data, shifts="brightness", progress=False)
        return {s.name: s.divergence for s in report.sites if s.name in sites}, report

    ibn_values, ibn_report = at_sites(ibn)
    control_values, control_report = at_sites(control)
    for name in sites:
        assert ibn_values[name] < 0.6 * control_values[name], (name, ibn_values, control_values)
    assert ibn_report.converted and not control_report.converted
    assert [s.site for s in ibn_report.sites if s.site] == ["ibn (converted)"] * 2


def test_suggestion_rule_is_the_longest_qualifying_prefix_without_the_last_stage() -> None:
    content = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert suggest_stages({0: 9, 1: 10, 2: 5, 3: 0.5, 4: 50}, content) == (1, 2)
    assert suggest_stages({1: 10, 2: 10, 3: 10, 4: 10}, content) == (1, 2, 3)  # never stage 4
    assert suggest_stages({1: CONTENT_FACTOR, 2: 10, 3: 10}, content) == (1, 2)  # at the factor
    assert suggest_stages({1: 2.9, 2: 10, 3: 10}, content) == ()  # a prefix must start at 1
    assert suggest_stages({0: 100.0}, {0: 1.0}) == ()


def test_report_json_table_and_plot(trained, test_data, tmp_path) -> None:
    report = analyze_divergence(
        trained,
        test_data,
        shifts="brightness_down,contrast_down",
        images=64,
        progress=False,
        arch=SOURCE,
    )
    data = json.loads(report.to_json())
    assert set(data) == {
        "arch",
        "domain_a",
        "domain_b",
        "images",
        "shifts",
        "converted",
        "sites",
        "stages",
        "suggested_stages",
        "rule",
    }
    assert data["images"] == 64 and data["shifts"] == ["brightness_down", "contrast_down"]
    site = data["sites"][1]
    assert site["name"] == "layer1.0.bn1" and site["site"] == "IBN-a default"
    mean = sum(site["per_shift"].values()) / 2
    assert site["divergence"] == pytest.approx(mean, rel=1e-12)
    assert data["suggested_stages"] == list(report.suggested_stages)
    table = report.table().splitlines()
    assert len(table) == 2 + 9 + 1 + 2 + 4  # sites table, blank line, stage table (stem + 3)
    path = report.plot(tmp_path / "div.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_analyze_a_checkpoint_prints_the_command(trained, tmp_path) -> None:
    plan = ConversionPlan(arch=SOURCE, layout="none", stages=(), ratio=None, sites=())
    checkpoint = tmp_path / "baseline.safetensors"
    ibnify.save(apply_plan(trained, plan), checkpoint)
    args = [
        "analyze",
        str(checkpoint),
        "--dataset",
        "digits",
        "--shift",
        "brightness_down",
        "--images",
        "128",
        "--plot",
        str(tmp_path / "d.png"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "suggested --stages 1-2" in result.output
    expected = (
        f"run: ibnify convert {SOURCE} --weights {checkpoint} --stages 1-2 "
        "-o digits_resnet_ibn.safetensors"
    )
    assert expected in result.output.splitlines()
    assert (tmp_path / "d.png").is_file()
    as_json = json.loads(CliRunner().invoke(cli, [*args[:-2], "--json"]).output)
    assert as_json["command"] == expected.removeprefix("run: ")


def test_the_printed_convert_command_rebuilds_the_analysed_model(tmp_path, monkeypatch) -> None:
    """A model built by name without weights (its init from --seed 3), analysed at
    --input-size 12: the printed command carries both and converts that very model."""
    monkeypatch.chdir(tmp_path)
    args = [
        "analyze",
        SOURCE,
        "--dataset",
        "digits",
        "--shift",
        "brightness_down",
        "--images",
        "32",
        "--input-size",
        "12",
        "--seed",
        "3",
        "--quiet",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("run: "))
    assert " --input-size 3,12,12 --seed 3 " in line
    done = CliRunner().invoke(cli, line.removeprefix("run: ibnify ").split())
    assert done.exit_code == 0, done.output
    torch.manual_seed(3)
    stages = tuple(int(s) for s in line.split("--stages ")[1].split()[0].split("-"))
    expected = ibnify.convert(digits_resnet(), stages=tuple(range(stages[0], stages[-1] + 1)))
    rebuilt = ibnify.load(tmp_path / "digits_resnet_ibn.safetensors")
    recipe = ibnify.read_recipe(tmp_path / "digits_resnet_ibn.safetensors")
    assert recipe.input_size == (3, 12, 12)
    state = rebuilt.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in expected.state_dict().items())


def test_weights_with_original_or_ibn_keys(tmp_path) -> None:
    plain, converted = tmp_path / "plain.pth", tmp_path / "ibn.pth"
    torch.save(digits_resnet().state_dict(), plain)
    torch.save(ibnify.convert(SOURCE).state_dict(), converted)  # default layout: stages 1-3
    assert get_plan(ModelRequest(SOURCE, str(plain)).resolve().model) is None
    loaded = ModelRequest(SOURCE, str(converted)).resolve()
    assert [s.name for s in get_plan(loaded.model).sites] == [
        "layer1.0.bn1",
        "layer2.0.bn1",
        "layer3.0.bn1",
    ]
    assert loaded.rebuild_arguments() == {
        "spec": SOURCE,
        "weights": str(converted),
        "model_kwargs": {},
    }


def test_bad_inputs_end_in_one_error_line(tmp_path) -> None:
    """Exit 1, one `error:` line, no traceback, no file written. One case runs in its own
    process, the others through click's runner."""
    f = bad_class_folders(tmp_path)
    forked = {
        "different classes": (
            [SOURCE, "--domain-a", f["a"], "--domain-b", f["b"]],
            "hold different class sets",
        ),
    }
    in_process = {
        "no batchnorm": (["timm:convnext_atto", "--dataset", "digits"], "has no BatchNorm"),
        "empty folder": ([SOURCE, "--data", f["empty"]], "holds no images"),
        "unknown shift": ([SOURCE, "--dataset", "digits", "--shift", "sparkle"], "unknown shift"),
    }
    before = sorted(tmp_path.rglob("*"))

    def argv(name: str, args: list) -> list[str]:
        return ["analyze", *map(str, args), "--plot", str(tmp_path / f"{name}.png")]

    check_bad_inputs(forked, in_process, argv)
    assert sorted(tmp_path.rglob("*")) == before


def test_checkpoint_rebuild_arguments_carry_num_classes(tmp_path) -> None:
    """The printed `ibnify convert` command must rebuild a head of the checkpoint's size."""
    checkpoint = tmp_path / "seven.safetensors"
    torch.manual_seed(0)
    ibnify.save(ibnify.convert(SOURCE, model_kwargs={"num_classes": 7}), checkpoint)
    loaded = ModelRequest(str(checkpoint)).resolve()
    assert loaded.rebuild_arguments() == {
        "spec": SOURCE,
        "weights": str(checkpoint),
        "model_kwargs": {"num_classes": 7},
    }
    assert loaded.label == str(checkpoint)
