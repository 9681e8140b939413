"""Issue 21 section 4: ``finetune`` on a user's own model class, end to end.

``MyNet`` below is a class no registry knows. Converted, it fine-tunes through
``ibnify.finetune`` with and without an output folder, distils from its unconverted self,
resumes bit for bit, and its run's ``model.safetensors`` loads back with
``ibnify.load(path, base=MyNet())``. What cannot work is refused before the first step, in one
line with advice that fits the model, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import ibnify
from ibnify.cli import cli
from ibnify.core.layers import IBN
from ibnify.data.images import ImageData
from ibnify.errors import CheckpointError, InvalidOptionError
from ibnify.models.registry import build_model
from ibnify.train.loop import finetune
from ibnify.train.state import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, load_training_state

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (3, 16, 16)
RUN_FILES = sorted([CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE])


class MyNet(nn.Module):
    """Two residual blocks at two resolutions, dropout, and a head named ``head``."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.a1, self.n1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a2, self.n2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.down = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.b1, self.m1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b2, self.m2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.n2(self.a2(torch.relu(self.n1(self.a1(x))))))
        x = self.down(x)
        x = torch.relu(x + self.m2(self.b2(torch.relu(self.m1(self.b1(x))))))
        return self.head(self.drop(x.mean((2, 3))))


def converted(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the unconverted base, its IBN form): IN goes into ``n1`` (default: stage 1's block)"""
    torch.manual_seed(seed)
    base = MyNet()
    return base, ibnify.convert(base, input_size=SIZE)


def tensor_data(n: int = 48, classes: int = 3, labelled: bool = True) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, *SIZE, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    if not labelled:
        labels = torch.full((n,), -1)
    return ImageData(TensorDataset(images, labels), (0.5,) * 3, (0.25,) * 3, classes, labelled)


def folder(root: Path) -> Path:
    generator = torch.Generator().manual_seed(3)
    for label in ("a", "b", "c"):
        (root / label).mkdir(parents=True)
        for index in range(4):
            pixels = (torch.rand(24, 24, 3, generator=generator) * 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{index}.png")
    return root


def moved(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


OPTIONS = {"epochs": 2, "batch_size": 16, "lr": 0.05, "quiet": True}


def test_the_conversion_under_test_is_of_an_unknown_class(tmp_path: Path) -> None:
    _, model = converted()
    sites = sorted(n for n, m in model.named_modules() if isinstance(m, IBN))
    assert sites == ["n1"] and type(model) is MyNet
    # Saved, it names its class; loaded without the base, one error names that class.
    ibnify.save(model, tmp_path / "mine.safetensors")
    with pytest.raises(CheckpointError, match=r"instance of .*MyNet.*base=MyNet\(\.\.\.\)"):
        ibnify.load(tmp_path / "mine.safetensors")


def test_finetune_without_out_dir_trains_and_hands_the_model_back_in_its_mode() -> None:
    base, model = converted()
    model.eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, tensor_data(), **OPTIONS)
    assert result.model is model and result.completed and len(result.history) == 2
    assert {"head.weight", "n1.IN.weight", "n1.BN.running_mean"} <= moved(before, model)
    assert not any(m.training for m in model.modules())  # eval in, eval out
    assert moved(base_state, base) == set()  # the base it was converted from is untouched


def test_finetune_with_out_dir_from_a_folder_writes_a_model_that_loads_with_its_base(
    tmp_path: Path,
) -> None:
    _, model = converted()
    out = tmp_path / "run"
    result = ibnify.finetune(model, folder(tmp_path / "images"), out_dir=str(out), **OPTIONS)
    assert result.completed and sorted(p.name for p in out.iterdir()) == RUN_FILES
    loaded = ibnify.load(out / MODEL_FILE, base=MyNet())
    assert type(loaded) is MyNet and isinstance(loaded.n1, IBN)
    state, trained = loaded.state_dict(), model.state_dict()
    assert state.keys() == trained.keys()
    assert [k for k in state if not torch.equal(state[k], trained[k])] == []
    assert load_training_state(out / CHECKPOINT_FILE)["epoch"] == 2


def test_stop_after_then_resume_in_python_equals_the_straight_run(tmp_path: Path) -> None:
    """Dropout and the shuffle draw randomness; the resumed run is the straight one."""
    straight = finetune(converted()[1], tensor_data(), **{**OPTIONS, "epochs": 3}).model
    out = str(tmp_path / "run")
    first = finetune(
        converted()[1], tensor_data(), out_dir=out, stop_after=1, **{**OPTIONS, "epochs": 3}
    )
    assert not first.completed
    resumed = finetune(
        converted()[1], tensor_data(), out_dir=out, resume=True, **{**OPTIONS, "epochs": 3}
    ).model
    a, b = straight.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    other_seed = finetune(converted()[1], tensor_data(), seed=1, **{**OPTIONS, "epochs": 3})
    assert not torch.equal(other_seed.model.state_dict()["head.weight"], a["head.weight"])


def test_distillation_from_the_unconverted_model_with_out_dir(tmp_path: Path) -> None:
    base, model = converted()
    base.train()
    base.stem.eval()  # a mixed-mode teacher comes back as it was
    teacher_state = {k: v.clone() for k, v in base.state_dict().items()}
    out = tmp_path / "kd"
    result = finetune(model, tensor_data(labelled=False), teacher=base, out_dir=str(out), **OPTIONS)
    assert [line["metric"] for line in result.history] == ["teacher_agreement"] * 2
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert moved(teacher_state, base) == set()
    assert base.training and not base.stem.training and base.stem[0].weight.requires_grad
    loaded = ibnify.load(out / MODEL_FILE, base=MyNet())
    assert torch.equal(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_a_model_save_would_refuse_is_refused_before_training_and_nothing_written(
    tmp_path: Path,
) -> None:
    """A registry model whose head was replaced by hand: its recipe rebuilds another model."""
    torch.manual_seed(0)
    kwargs = {"width": 4, "image_size": 16}
    base, source = build_model("ibnify:digits_resnet", **kwargs)
    model = ibnify.convert(base, stages=(1,), arch=source, model_kwargs=kwargs)
    model.fc = nn.Linear(16, 3)
    epochs: list[dict] = []
    out = tmp_path / "run"
    with pytest.raises(InvalidOptionError) as caught:
        finetune(model, tensor_data(), out_dir=str(out), on_epoch=epochs.append, **OPTIONS)
    assert str(caught.value) == (
        f"finetune(..., out_dir={str(out)!r}) saves the model after every epoch, but its head "
        "has 3 classes and its recipe 10 (a head replaced by hand is not recorded); give the "
        "model a fresh head with finetune(..., num_classes=3) instead"
    )
    assert epochs == [] and not out.exists()
    # The advice works: a fresh 3-class head through finetune saves and loads back.
    model.fc = nn.Linear(16, 10)
    finetune(model, tensor_data(), out_dir=str(out), num_classes=3, **OPTIONS)
    assert ibnify.load(out / MODEL_FILE).fc.out_features == 3


def test_a_recipe_that_does_not_rebuild_is_refused_before_training(tmp_path: Path) -> None:
    """Another module swapped in by hand: save's own reason, and the way out."""
    torch.manual_seed(0)
    kwargs = {"width": 4, "image_size": 16, "num_classes": 3}
    base, source = build_model("ibnify:digits_resnet", **kwargs)
    model = ibnify.convert(base, stages=(1,), arch=source, model_kwargs=kwargs)
    model.layer3[0].conv2 = nn.Conv2d(16, 16, 1, bias=False)
    out = tmp_path / "run"
    with pytest.raises(InvalidOptionError) as caught:
        finetune(model, tensor_data(), out_dir=str(out), **OPTIONS)
    message = str(caught.value)
    assert message.startswith(
        f"finetune(..., out_dir={str(out)!r}) saves the model after every epoch, but it cannot "
        "be saved: cannot save: ibnify:digits_resnet built with model_kwargs"
    )
    assert "layer3.0.conv2.weight" in message and message.count("\n") == 0
    assert message.endswith("or fine-tune without out_dir and save it yourself")
    assert not out.exists()
    # Without an output folder nothing is saved, so the same model trains.
    assert finetune(model, tensor_data(), **OPTIONS).completed


def test_cli_finetune_of_an_own_class_file_names_the_python_call(tmp_path: Path) -> None:
    _, model = converted()
    ibnify.save(model, tmp_path / "mine.safetensors")
    images = folder(tmp_path / "images")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        ["finetune", str(tmp_path / "mine.safetensors"), "--data", str(images), "--out", str(out)],
    )
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "holds a MyNet (" in result.output and "ibnify finetune cannot load it" in result.output
    assert "ibnify.finetune(ibnify.load(path, base=MyNet(...)), data, out_dir=...)" in (
        result.output
    )
    assert not out.exists()
