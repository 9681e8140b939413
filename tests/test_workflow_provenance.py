"""Every saved file loads: the one Recipe a converted model carries (issues 16 and 17).

Each test runs the user's command or call that failed before the Recipe: a model converted
twice, a model converted from an instance, ``convert`` of a checkpoint, ``--num-classes`` with
weights of another class count, ``--input-size`` forgotten, a checkpoint written by 0.1.0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ibnify
from ibnify.cli import cli
from ibnify.core.recipe import FORMAT, Recipe, get_recipe, with_adaptation
from ibnify.errors import CheckpointError, ConversionError, WeightsError
from ibnify.models.checkpoint import recipe_input_size
from ibnify.models.small import digits_resnet
from tests.helpers import randomize_norms

DATA = Path(__file__).parent / "data"
TINY = {"width": 4, "image_size": 16}
DIGITS = "ibnify:digits_resnet"


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_checkpoint_written_by_0_1_0_loads_and_computes_the_same() -> None:
    """tests/data/checkpoint_format1.safetensors was written by ibnify 0.1.0 (recipe format 1)
    from digits_resnet width 4, IBN-a stages 1,2; the reference holds its output."""
    path = DATA / "checkpoint_format1.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        stored = json.loads(handle.metadata()["ibnify_recipe"])
    assert stored["format"] == "ibnify.checkpoint/1" and "plans" not in stored
    reference = load_file(str(DATA / "checkpoint_format1_reference.safetensors"))
    model = ibnify.load(path)
    # The reference was computed on another machine: its CPU kernels round float32 sums
    # differently (1.2e-7 apart seen on AVX-512 vs AVX2), so the comparison has a tolerance,
    # far below what a wrong transfer or a wrong plan changes (outputs of order 1).
    output = _outputs(model, reference["input"])
    torch.testing.assert_close(output, reference["output"], rtol=1e-5, atol=1e-5)
    assert reference["output"].std() > 0.1  # the check is not vacuous
    recipe = get_recipe(model)
    assert recipe.source == DIGITS and recipe.model_kwargs == {"width": 4, "image_size": 8}
    assert [(p.layout, p.stages) for p in recipe.plans] == [("resnet-a", (1, 2))]
    assert recipe.input_size is None  # format 1 did not record it


@pytest.mark.parametrize(
    ("second", "layouts", "sites"),
    [
        ({"stages": (3,)}, ["resnet-a", "resnet-a"], [2, 1]),
        ({"layout": "b"}, ["resnet-a", "resnet-b"], [2, 3]),
    ],
)
def test_stacked_conversions_save_and_load_exactly(tmp_path, second, layouts, sites) -> None:
    first = ibnify.convert(DIGITS, stages=(1, 2), model_kwargs=TINY)
    randomize_norms(first)
    twice = ibnify.convert(first, **second)
    assert get_recipe(first).plans == get_recipe(twice).plans[:1]  # first is left as it was
    recipe = get_recipe(twice)
    assert [p.layout for p in recipe.plans] == layouts
    assert [len(p.sites) for p in recipe.plans] == sites
    path = ibnify.save(twice, tmp_path / "twice.safetensors")
    stored = ibnify.read_recipe(path)
    assert stored.format == FORMAT and [p.layout for p in stored.plans] == layouts
    loaded = ibnify.load(path)
    assert get_recipe(loaded).plans == recipe.plans
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(twice, x), atol=1e-6, rtol=0)


def test_torchvision_model_converted_twice_loads(tmp_path) -> None:
    """The issue's case: resnet18 IBN-a, then stage 4 (at 64 px: layer4 keeps 2×2 maps)."""
    twice = ibnify.convert(ibnify.convert("resnet18", input_size=(3, 64, 64)), stages=(4,))
    assert get_recipe(twice).input_size == (3, 64, 64)  # the second conversion reused it
    path = ibnify.save(twice, tmp_path / "r18.safetensors")
    assert ibnify.read_recipe(path).stages == [1, 2, 3, 4]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(
        _outputs(ibnify.load(path), x), _outputs(twice, x), atol=1e-6, rtol=0
    )


def test_converting_twice_says_what_happened() -> None:
    converted = ibnify.convert(DIGITS, model_kwargs=TINY)
    with pytest.raises(ConversionError) as raised:
        ibnify.convert(converted)
    assert str(raised.value) == (
        "ibnify:digits_resnet is already converted (resnet-a stages 1,2,3): layout a finds no "
        "BatchNorm left to convert in its default stages; ask for stages not converted yet, "
        "or another layout"
    )


def test_model_converted_from_an_instance_saves_its_class_or_its_source(tmp_path) -> None:
    converted = ibnify.convert(digits_resnet(**TINY))
    x = torch.randn(2, 3, 16, 16)
    by_class = ibnify.save(converted, tmp_path / "by_class.safetensors")
    assert ibnify.read_recipe(by_class).source is None
    assert ibnify.read_recipe(by_class).base_class == "ibnify.models.small.DigitsResNet"
    with pytest.raises(CheckpointError) as raised:
        ibnify.load(by_class)
    assert str(raised.value) == (
        f"cannot rebuild checkpoint {str(by_class)!r}: it was converted from an instance of "
        "ibnify.models.small.DigitsResNet, which ibnify cannot build by name; give the "
        "unconverted model in Python: ibnify.load(path, base=DigitsResNet(...))"
    )
    loaded = ibnify.load(by_class, base=digits_resnet(**TINY))
    assert torch.equal(_outputs(loaded, x), _outputs(converted, x))
    by_class.unlink()
    with pytest.raises(CheckpointError, match=r"16 channels, the plan expects 4\); give its"):
        ibnify.save(converted, tmp_path / "x.safetensors", source=DIGITS)  # width 16 != 4
    assert list(tmp_path.iterdir()) == []
    path = ibnify.save(converted, tmp_path / "x.safetensors", source=DIGITS, model_kwargs=TINY)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_outputs(ibnify.load(path), x), _outputs(converted, x))
    named = ibnify.convert(digits_resnet(**TINY), arch=DIGITS, model_kwargs=TINY)
    assert get_recipe(named).source == DIGITS  # arch= names the source
    ibnify.save(named, tmp_path / "named.safetensors")


def test_cli_convert_adds_stages_to_a_checkpoint(tmp_path) -> None:
    runner = CliRunner()
    first, second = tmp_path / "a.safetensors", tmp_path / "a3.safetensors"
    args = ["convert", DIGITS, "--stages", "1,2", "--input-size", "16", "-o", str(first)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["convert", str(first), "--stages", "3", "-o", str(second)])
    assert result.exit_code == 0, result.output
    assert "recipe: resnet-a stages 1,2 then resnet-a stages 3\n" in result.stdout
    recipe = ibnify.read_recipe(second)
    assert [p.stages for p in recipe.plans] == [(1, 2), (3,)]
    assert recipe.input_size == (3, 16, 16)
    x = torch.randn(2, 3, 16, 16)
    assert ibnify.load(second).layer3[0].bn1.IN.num_features == 32
    assert _outputs(ibnify.load(second), x).shape == (2, 10)
    again = runner.invoke(cli, ["convert", str(second), "-o", str(tmp_path / "b.safetensors")])
    line = _one_error_line(again)
    assert "is already converted (resnet-a stages 1,2 then resnet-a stages 3)" in line
    weights = runner.invoke(
        cli, ["convert", str(first), "--num-classes", "3", "-o", "c.safetensors"]
    )
    assert "--num-classes apply to a model name" in _one_error_line(weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a3.safetensors"]


def test_cli_convert_refuses_another_suffix_and_gives_no_python_advice(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["convert", DIGITS, "-o", str(tmp_path / "x.onnx")])
    line = _one_error_line(result)
    assert "does not end in .safetensors" in line and list(tmp_path.iterdir()) == []
    crafted = tmp_path / "hub.safetensors"
    good = ibnify.save(ibnify.convert(DIGITS, model_kwargs=TINY), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        recipe = json.loads(handle.metadata()["ibnify_recipe"])
    recipe["source"] = "hf-hub:someone/model"
    save_file(load_file(str(good)), str(crafted), metadata={"ibnify_recipe": json.dumps(recipe)})
    args = ["convert", str(crafted), "--stages", "3", "-o", str(tmp_path / "y.safetensors")]
    line = _one_error_line(CliRunner().invoke(cli, args))
    assert "cannot be built by name" in line and "ibnify.load(" not in line


def test_cli_convert_num_classes_gives_a_fresh_head(tmp_path) -> None:
    """``convert MODEL --weights W --num-classes N``: the body loads, the head is new."""
    original = digits_resnet()  # 10 classes
    weights = tmp_path / "w.pth"
    torch.save(original.state_dict(), weights)
    out = tmp_path / "three.safetensors"
    args = ["convert", DIGITS, "--weights", str(weights), "--num-classes", "3", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "head fc: 10 → 3 classes, fresh weights\n" in result.stdout
    recipe = ibnify.read_recipe(out)
    assert recipe.model_kwargs == {"num_classes": 3} and recipe.num_classes == 3
    assert recipe.head == {"name": "fc", "from_classes": 10, "num_classes": 3}
    loaded = ibnify.load(out)
    assert loaded.fc.out_features == 3
    assert torch.equal(loaded.conv1.weight, original.conv1.weight)
    assert torch.equal(loaded.layer1[0].bn1.BN.running_var, original.layer1[0].bn1.running_var[8:])


def test_load_of_tensors_that_do_not_fit_reads_as_a_sentence(tmp_path) -> None:
    good = ibnify.save(ibnify.convert(DIGITS, model_kwargs=TINY), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        recipe = json.loads(handle.metadata()["ibnify_recipe"])
    recipe["model_kwargs"] = {"width": 4, "num_classes": 5}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={"ibnify_recipe": json.dumps(recipe)})
    with pytest.raises(CheckpointError) as raised:
        ibnify.load(bad)
    assert str(raised.value) == (
        f"checkpoint {str(bad)!r}: the tensors do not fit DigitsResNet: 2 wrong shape "
        "(fc.weight, fc.bias)"
    )


def test_input_size_and_classes_are_recorded(tmp_path) -> None:
    converted = ibnify.convert(DIGITS, model_kwargs=TINY, input_size=(3, 12, 12))
    assert recipe_input_size(converted) == (3, 12, 12) and get_recipe(converted).num_classes == 10
    path = ibnify.save(converted, tmp_path / "m.safetensors")
    assert recipe_input_size(path) == (3, 12, 12)
    assert recipe_input_size(tmp_path / "missing.safetensors") is None
    default = ibnify.convert(DIGITS, model_kwargs={"width": 4, "image_size": 20})
    assert recipe_input_size(default) == (3, 20, 20)  # the model's own size


def test_inception_v3_takes_its_299_default() -> None:
    model = torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=False)
    converted = ibnify.convert(model, stages=(1,), arch="tv:inception_v3")
    assert recipe_input_size(converted) == (3, 299, 299)  # 224 does not even trace


def test_onnx_metadata_holds_the_recipe_and_verify_checks_every_plan(tmp_path) -> None:
    from ibnify.deploy.export import export_onnx
    from ibnify.deploy.verify import verify_onnx

    once = ibnify.convert(DIGITS, stages=(1, 2), model_kwargs=TINY)
    twice = ibnify.convert(once, stages=(3,))
    path = tmp_path / "twice.onnx"
    export_onnx(twice, path, input_size=16)
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    record = json.loads(metadata["ibnify.recipe"])
    assert Recipe.from_dict(record).plans == get_recipe(twice).plans
    assert metadata["ibnify.stages"] == "1,2,3" and metadata["ibnify.sites"] == "3"
    assert verify_onnx(path, twice, batch_sizes=(2,)).passed
    with pytest.raises(ibnify.errors.VerificationError) as raised:
        verify_onnx(path, once, batch_sizes=(2,))
    assert str(raised.value).endswith(
        "(layout resnet-a, stages 1,2 then layout resnet-a, stages 3), but the model is "
        "ibnify:digits_resnet (layout resnet-a, stages 1,2); the conversion differs"
    )


def test_adaptation_records_travel_with_the_file(tmp_path) -> None:
    converted = ibnify.convert(DIGITS, model_kwargs=TINY)
    with_adaptation(converted, {"kind": "adabn", "images": 64, "prior": 0.0})
    path = ibnify.save(converted, tmp_path / "adapted.safetensors")
    assert ibnify.read_recipe(path).adaptations == ({"kind": "adabn", "images": 64, "prior": 0.0},)
    assert get_recipe(ibnify.load(path)).adaptations == get_recipe(converted).adaptations
    with pytest.raises(ValueError, match="is a list, not a plain value"):
        with_adaptation(converted, {"kind": ["adabn"]})


def test_one_resolver_serves_analyze_and_distill(tmp_path) -> None:
    from ibnify.commands.finetune import load_teacher
    from ibnify.commands.inputs import ModelRequest

    path = ibnify.save(ibnify.convert(DIGITS, model_kwargs=TINY), tmp_path / "m.safetensors")
    source = ModelRequest(str(path)).resolve()
    assert (source.source, source.checkpoint, source.model_kwargs) == (DIGITS, str(path), TINY)
    with pytest.raises(WeightsError) as raised:
        load_teacher(DIGITS, ibnify.read_recipe(path))  # ibnify: models have no pretrained weights
    assert str(raised.value) == (
        "ibnify:digits_resnet has no pretrained weights to download; pass a local weights file "
        "instead: `distill_from=FILE`"
    )


README = Path(__file__).resolve().parents[1] / "README.md"
FINETUNE_GUIDE = README.parent / "docs" / "finetune.md"  # the fine-tune block
# The README's "your trained model" is resnet50; a smaller one of the same family runs faster.
_README_SWAPS = {
    "torchvision.models.resnet50()": "torchvision.models.resnet18()",
    'source="tv:resnet50"': 'source="tv:resnet18"',
}


def test_readme_quickstart_and_finetune_blocks_run_in_order(tmp_path, monkeypatch) -> None:
    """The README's Quickstart block and docs/finetune.md's fine-tune block, run in order, once
    failed at the fine-tune block (the Quickstart saved a model converted from an instance that no
    command could load)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quick = next(block for block in blocks if "ibnify.save(ibn" in block)
    guide = re.findall(r"```python\n(.*?)```", FINETUNE_GUIDE.read_text(), flags=re.S)
    tune = next(block for block in guide if "ibnify.finetune(model" in block)
    for old, new in _README_SWAPS.items():
        assert old in quick, old
        quick = quick.replace(old, new)
    for label in range(10):  # train/: the 10 classes the fine-tune block names
        folder = tmp_path / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(2):
            pixels = torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(quick, "README Quickstart", "exec"), namespace)
    exec(compile(tune, "README Fine-tune", "exec"), namespace)
    assert len(namespace["result"].history) == 5
    saved = tmp_path / "runs" / "r50" / "model.safetensors"
    recipe = ibnify.read_recipe(saved)
    assert recipe.source == "tv:resnet18" and recipe.model_kwargs == {"num_classes": 10}
    assert ibnify.load(saved).fc.out_features == 10
