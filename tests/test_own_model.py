"""A user's own model class (no registry knows it) through save → load, and wrapped models.

The file records the class by name and loads only with the unconverted base given in Python:
``ibnify.load(path, base=MyNet())``. Wrappers (``torch.compile``, ``DataParallel``) are
converted unwrapped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

import ibnify
from ibnify.cli import cli
from ibnify.core.layers import IBN
from ibnify.core.recipe import get_recipe
from ibnify.data.images import ImageData
from ibnify.errors import CheckpointError
from tests.helpers import ResidualBlock

SIZE = (3, 16, 16)


class MyNet(nn.Module):
    """Two stages of one block each, then a classifier."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block1 = ResidualBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        self.block2 = ResidualBlock(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(torch.relu(self.down(self.block1(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


class OtherNet(MyNet):
    """Same layers, another class: a base of the wrong class is refused."""


def _trained(seed: int = 0) -> MyNet:
    """A MyNet with non-trivial BN statistics and affine values (what a trained model has)."""
    torch.manual_seed(seed)
    model = MyNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_own_class_saves_with_its_class_and_loads_with_a_base(tmp_path) -> None:
    base = _trained()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    converted = ibnify.convert(base, input_size=SIZE)
    # the generic rule's default: every stage but the last (here stage 1 of 2)
    assert [n for n, m in converted.named_modules() if isinstance(m, IBN)] == ["block1.bn1"]
    path = ibnify.save(converted, tmp_path / "mine.safetensors")
    recipe = ibnify.read_recipe(path)
    assert recipe.source is None
    assert recipe.base_class == f"{__name__}.MyNet"
    x = torch.randn(3, *SIZE)
    loaded = ibnify.load(path, base=MyNet())  # an untrained base: every tensor comes from the file
    assert torch.equal(_out(loaded, x), _out(converted, x))
    assert set(load_file(str(path))) == set(converted.state_dict())
    assert get_recipe(loaded).base_class == f"{__name__}.MyNet"
    # the caller's base model is left as it was
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(isinstance(m, IBN) for m in base.modules())


def test_loading_without_a_base_or_with_a_wrong_one_is_one_clear_error(tmp_path) -> None:
    path = ibnify.save(ibnify.convert(_trained(), input_size=SIZE), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as raised:
        ibnify.load(path)
    assert str(raised.value).endswith(
        f"it was converted from an instance of {__name__}.MyNet, which ibnify cannot build by "
        "name; give the unconverted model in Python: ibnify.load(path, base=MyNet(...))"
    )
    with pytest.raises(CheckpointError, match=r"converted from a MyNet .*but base is a OtherNet"):
        ibnify.load(path, base=OtherNet())
    plain = ibnify.save(_trained(), tmp_path / "plain.safetensors")  # saved unconverted
    with pytest.raises(CheckpointError) as raised:
        ibnify.load(plain)
    assert str(raised.value).endswith(
        f"it was saved as an instance of {__name__}.MyNet, which ibnify cannot build by name; "
        "give the unconverted model in Python: ibnify.load(path, base=MyNet(...))"
    )
    with pytest.raises(CheckpointError, match=r"base must be the unconverted model"):
        ibnify.load(path, base=ibnify.convert(MyNet(), input_size=SIZE))
    assert ibnify.load(path, base=MyNet(classes=7)).fc.out_features == 5  # the file's head
    other_body = MyNet()
    other_body.block1.conv2 = nn.Conv2d(8, 8, 1, bias=False)  # not the model that was saved
    with pytest.raises(CheckpointError, match=r"do not fit MyNet: 1 wrong shape"):
        ibnify.load(path, base=other_body)


def test_the_cli_refuses_a_checkpoint_that_needs_a_base_in_one_line(tmp_path) -> None:
    path = ibnify.save(ibnify.convert(_trained(), input_size=SIZE), tmp_path / "m.safetensors")
    result = CliRunner().invoke(cli, ["export", str(path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "ibnify.load(path, base=MyNet(...))" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_damaged_base_class_is_refused(tmp_path) -> None:
    path = ibnify.save(ibnify.convert(_trained(), input_size=SIZE), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    recipe = json.loads(metadata["ibnify_recipe"])
    recipe["base_class"] = "os.system('x')"
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"ibnify_recipe": json.dumps(recipe)})
    with pytest.raises(
        CheckpointError, match=r"damaged ibnify recipe \(base_class is not a name\)"
    ):
        ibnify.load(bad, base=MyNet())
    recipe["base_class"] = None  # neither a source nor a class: nothing says what it is
    save_file(load_file(str(path)), str(bad), metadata={"ibnify_recipe": json.dumps(recipe)})
    with pytest.raises(CheckpointError, match=r"no source model name"):
        ibnify.load(bad, base=MyNet())


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_convert_unwrapped(wrap: str, tmp_path) -> None:
    base = _trained()
    wrapped = torch.compile(base) if wrap == "compile" else nn.DataParallel(base)
    plain = ibnify.convert(_trained(), input_size=SIZE)
    converted = ibnify.convert(wrapped, input_size=SIZE)
    assert type(converted) is MyNet  # the wrapper is not returned: wrap the result again
    assert list(converted.state_dict()) == list(plain.state_dict())  # no "module."/"_orig_mod."
    x = torch.randn(2, *SIZE)
    assert torch.equal(_out(converted, x), _out(plain, x))
    assert ibnify.plan(wrapped, input_size=SIZE).sites == ibnify.plan(base, input_size=SIZE).sites
    path = ibnify.save(nn.DataParallel(converted), tmp_path / "w.safetensors")
    assert not any(k.startswith("module.") for k in load_file(str(path)))


def test_the_readme_block_for_your_own_class_runs(tmp_path, monkeypatch) -> None:
    """docs/convert.md's "your own model class" block, run with this module's MyNet."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "convert.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "base=MyNet()" in b)
    monkeypatch.chdir(tmp_path)
    namespace = {"ibnify": ibnify, "MyNet": MyNet}
    exec(compile(block, "README own class", "exec"), namespace)
    x = torch.randn(2, *SIZE)
    assert torch.equal(_out(namespace["same"], x), _out(namespace["ibn"], x))
    assert ibnify.read_recipe(tmp_path / "mine.safetensors").base_class == f"{__name__}.MyNet"


def test_a_run_that_gave_your_own_class_another_head_loads_with_the_original_base(
    tmp_path,
) -> None:
    """finetune(..., num_classes=7) on a 5-class MyNet writes a file whose recipe records the
    reset head; load(path, base=MyNet()) gives the base that head again, then loads strictly."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, *SIZE, generator=generator)
    labels = torch.randint(0, 7, (16,), generator=generator)
    data = ImageData(TensorDataset(images, labels), (0.5,) * 3, (0.25,) * 3, 7, True, "tiny")
    model = ibnify.convert(_trained(), input_size=SIZE)
    result = ibnify.finetune(
        model, data, epochs=1, batch_size=8, quiet=True, num_classes=7, out_dir=str(tmp_path)
    )
    assert result.model.fc.out_features == 7
    loaded = ibnify.load(tmp_path / "model.safetensors", base=MyNet())
    x = torch.randn(2, *SIZE)
    assert loaded.fc.out_features == 7
    assert torch.equal(_out(loaded, x), _out(result.model, x))
