"""Issue 17 items 2-4: class count, frozen stays frozen, distillation leaves the teacher alone.

Each test runs the user's command or call that failed before: a fresh head of another size
(``finetune --num-classes``), a head that does not fit the data refused in one line before
training and at evaluation, frozen BNs giving frozen IBN halves, and a teacher handed back as it
was (or refused in one line when it does not fit the student).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import ibnify
from ibnify.cli import cli
from ibnify.core.layers import IBN, instance_norm_from_batchnorm
from ibnify.data.images import ImageData
from ibnify.errors import InvalidOptionError
from ibnify.models.checkpoint import read_recipe
from ibnify.models.heads import classifier_name, num_classes_of, reset_classifier, with_classifier
from ibnify.models.registry import build_model
from ibnify.train.loop import finetune
from ibnify.train.state import MODEL_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width": 4, "image_size": 8}


def tiny_converted(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {**TINY, "num_classes": num_classes}
    model, source = build_model("ibnify:digits_resnet", **kwargs)
    return ibnify.convert(model, stages=(1,), arch=source, model_kwargs=kwargs)


def tiny_data(n: int = 32, num_classes: int = 10, labelled: bool = True) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 8, 8, generator=generator)
    labels = (
        torch.randint(0, num_classes, (n,), generator=generator)
        if labelled
        else torch.full((n,), -1)
    )
    return ImageData(
        TensorDataset(images, labels), (0.5,) * 3, (0.25,) * 3, num_classes, labelled, "tiny"
    )


def class_folder(root: Path, classes: int, per_class: int = 4) -> Path:
    generator = torch.Generator().manual_seed(1)
    for index in range(classes):
        (root / f"c{index}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"c{index}" / f"{i}.png")
    return root


def flags(model: nn.Module) -> tuple[list[bool], list[bool]]:
    """Every module's train flag and every parameter's requires_grad, in order."""
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


# --- item 2: class count -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "aux"),
    [
        ("resnet18", "fc", []),
        ("mobilenet_v3_small", "classifier.3", []),
        ("squeezenet1_0", "classifier.1", []),
        ("googlenet", "fc", ["aux1.fc2", "aux2.fc2"]),
    ],
)
def test_torchvision_heads_get_a_fresh_head_on_a_copy(name: str, head: str, aux: list) -> None:
    kwargs = {"init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert classifier_name(model) == head and num_classes_of(model) == 1000
    fresh = with_classifier(model, 7)
    assert num_classes_of(fresh) == 7 and classifier_name(fresh) == head
    for name_aux in aux:
        assert fresh.get_submodule(name_aux).out_features == 7
    # The same keys as a model built with 7 classes: the saved file rebuilds by num_classes.
    built = torchvision.models.get_model(name, weights=None, num_classes=7, **kwargs)
    shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == shapes
    # The caller's model is unchanged; the body is copied exactly.
    assert num_classes_of(model) == 1000
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before)
    body = [k for k in before if not k.startswith((head, "aux"))]
    assert all(torch.equal(fresh.state_dict()[k], before[k]) for k in body)


def test_timm_model_uses_its_own_reset_classifier() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    assert reset_classifier(model, 3) == "fc"
    assert model.num_classes == 3 and model.fc.out_features == 3
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_no_classifier_head_is_one_line() -> None:
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InvalidOptionError) as caught:
        with_classifier(body, 3)
    assert str(caught.value) == (
        "Sequential has no classifier head (a final linear layer) to give 3 classes"
    )
    segmentation = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None
    )
    assert classifier_name(segmentation) is None and num_classes_of(segmentation) is None
    with pytest.raises(InvalidOptionError, match=r"^LRASPP has no classifier head"):
        reset_classifier(segmentation, 3)


def test_cli_finetune_refuses_a_head_that_does_not_fit_then_num_classes_fixes_it(
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "five.safetensors"
    ibnify.save(tiny_converted(num_classes=5), ckpt)
    folder = class_folder(tmp_path / "ten", 10, per_class=2)
    base = ["finetune", str(ckpt), "--data", str(folder), "--epochs", "1", "--batch-size", "4"]
    runner = CliRunner()
    refused = runner.invoke(cli, [*base, "--quiet", "--out", str(tmp_path / "o1")])
    assert refused.exit_code == 1
    assert refused.output == (
        "error: the model's head has 5 classes but the training data has 10; give it a fresh "
        "10-class head with --num-classes 10\n"
    )
    assert not (tmp_path / "o1").exists()  # refused before training
    out = tmp_path / "o2"
    fixed = runner.invoke(cli, [*base, "--quiet", "--num-classes", "10", "--out", str(out)])
    assert fixed.exit_code == 0, fixed.output
    assert read_recipe(out / MODEL_FILE).model_kwargs["num_classes"] == 10
    loaded = ibnify.load(out / MODEL_FILE)
    assert loaded.fc.out_features == 10 and isinstance(loaded.layer1[0].bn1, IBN)
    # evaluate: the 5-class checkpoint is refused on the 10-class folder, the new one scores.
    wrong = runner.invoke(cli, ["evaluate", str(ckpt), "--data", str(folder), "--shift", "gamma"])
    assert wrong.exit_code == 1
    assert wrong.output == (
        "error: model 'five' has a 5-class head but the evaluation data has 10 classes; "
        "evaluate it on images of the classes it was trained on\n"
    )
    right = runner.invoke(
        cli, ["evaluate", str(out / MODEL_FILE), "--data", str(folder), "--shift", "gamma"]
    )
    assert right.exit_code == 0, right.output
    assert "20 images" in right.output


def test_python_finetune_num_classes_and_evaluate_mismatch(tmp_path: Path) -> None:
    data = tiny_data(num_classes=3)
    model = tiny_converted(num_classes=5)
    with pytest.raises(InvalidOptionError) as caught:
        finetune(model, data, epochs=1, batch_size=16, quiet=True)
    assert str(caught.value) == (
        "the model's head has 5 classes but the training data has 3; give it a fresh 3-class "
        "head with `num_classes=3`"
    )
    with pytest.raises(InvalidOptionError, match=r"^model 'model' has a 5-class head but the"):
        ibnify.evaluate(model, data, shifts=())
    ten = tiny_data(num_classes=10)
    with pytest.raises(InvalidOptionError) as caught:
        finetune(model, data, epochs=1, batch_size=16, quiet=True, num_classes=3, val_data=ten)
    assert str(caught.value) == (
        "the model's head has 3 classes but the validation data has 10; validate on images of "
        "the classes it is trained on"
    )
    result = finetune(model, data, epochs=1, batch_size=16, quiet=True, num_classes=3)
    assert result.model is model and model.fc.out_features == 3
    ibnify.save(model, tmp_path / "three.safetensors")
    assert ibnify.load(tmp_path / "three.safetensors").fc.out_features == 3
    report = ibnify.evaluate(model, data, shifts=())
    assert 0.0 <= report.accuracy["model"]["clean"] <= 1.0 and report.images == 32


# --- item 3: frozen stays frozen -----------------------------------------------------------


def test_fully_frozen_resnet18_converts_with_no_trainable_tensor() -> None:
    model = torchvision.models.resnet18(weights=None)
    model.requires_grad_(False)
    converted = ibnify.convert(model)
    assert sum(p.requires_grad for p in converted.parameters()) == 0
    sites = [n for n, m in converted.named_modules() if isinstance(m, IBN)]
    assert len(sites) == 6  # IBN-a: bn1 of every block in layer1..layer3


def test_ibn_b_in_after_the_addition_follows_its_blocks_frozen_state() -> None:
    """IBN-b inserts a new IN after the residual addition: frozen in a frozen block (layer1
    here), trainable in a trainable one."""
    model = torchvision.models.resnet18(weights=None)
    model.layer1.requires_grad_(False)
    converted = ibnify.convert(model, layout="b", input_size=(3, 64, 64))
    post_add = {
        n: m
        for n, m in converted.named_modules()
        if isinstance(m, torch.nn.InstanceNorm2d) and n.endswith(".IN")
    }
    trainable = {n: m.weight.requires_grad for n, m in post_add.items()}
    assert trainable == {"layer1.1.IN": False, "layer2.1.IN": True}  # the paper's IBN-b sites


def test_partly_frozen_resnet18_freezes_exactly_the_sites_in_the_frozen_layer() -> None:
    model = torchvision.models.resnet18(weights=None)
    model.layer1.requires_grad_(False)
    converted = ibnify.convert(model)
    frozen = {n for n, p in converted.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in converted.named_parameters() if n.startswith("layer1.")}
    for name, module in converted.named_modules():
        if isinstance(module, IBN):
            expected = not name.startswith("layer1.")
            assert [p.requires_grad for p in module.parameters()] == [expected] * 4, name
    assert model.layer2[0].bn1.weight.requires_grad  # the caller's model is untouched


def test_frozen_batchnorm_gives_frozen_instance_norm_and_per_tensor_flags() -> None:
    bn = nn.BatchNorm2d(8)
    bn.weight.requires_grad_(False)  # weight frozen, bias trainable
    ibn = IBN.from_batchnorm(bn)
    assert [ibn.IN.weight.requires_grad, ibn.IN.bias.requires_grad] == [False, True]
    assert [ibn.BN.weight.requires_grad, ibn.BN.bias.requires_grad] == [False, True]
    stem = nn.BatchNorm2d(8).requires_grad_(False)
    norm = instance_norm_from_batchnorm(stem)
    assert not norm.weight.requires_grad and not norm.bias.requires_grad
    # A FrozenBatchNorm2d has buffers, not parameters: its IN half trains (documented).
    frozen = torchvision.ops.FrozenBatchNorm2d(8)
    assert all(p.requires_grad for p in IBN.from_batchnorm(frozen).IN.parameters())


# --- item 4: distillation leaves the teacher as it was ------------------------------------


def mixed_teacher() -> nn.Module:
    """A teacher in train mode with one block in eval mode and one frozen tensor."""
    teacher = tiny_converted(seed=1).train()
    teacher.layer1.eval()
    teacher.conv1.weight.requires_grad_(False)
    return teacher


def test_distillation_restores_teacher_modes_and_flags_also_when_training_raises() -> None:
    data = tiny_data(labelled=False)
    teacher = mixed_teacher()
    before = flags(teacher)
    finetune(tiny_converted(), data, teacher=teacher, epochs=1, batch_size=16, quiet=True)
    assert flags(teacher) == before

    def boom(metrics: dict) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        finetune(tiny_converted(), data, teacher=teacher, epochs=1, batch_size=16, on_epoch=boom)
    assert flags(teacher) == before
    # Converted afterwards, the former teacher trains (its body is not left frozen).
    assert sum(p.requires_grad for p in ibnify.convert(teacher).parameters()) > 20


def test_teacher_that_does_not_fit_the_student_is_refused_before_training() -> None:
    data = tiny_data(labelled=False)
    epochs = []
    five = tiny_converted(num_classes=5, seed=1)
    with pytest.raises(InvalidOptionError) as caught:
        finetune(tiny_converted(), data, teacher=five, epochs=1, quiet=True, on_epoch=epochs.append)
    assert str(caught.value) == (
        "the teacher gives 5 classes and the student 10; distil from the model the student "
        "was converted from (the same classes)"
    )
    # A teacher that cannot take the data's size (an IN over a 1x1 map, as IBN-b at tiny
    # inputs): one line naming the input shape, not torch's ValueError.
    tiny_input = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.InstanceNorm2d(3), nn.Flatten(), nn.Linear(3, 10)
    )
    with pytest.raises(InvalidOptionError) as caught:
        finetune(tiny_converted(), data, teacher=tiny_input, quiet=True, on_epoch=epochs.append)
    assert str(caught.value).startswith(
        "the teacher does not run on the training images (3x8x8): Expected more than 1 spatial"
    )
    assert epochs == []
    assert tiny_input.training  # handed back in the mode it came in


def test_teacher_by_name_offline_gives_finetune_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("offline")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing cached
    ckpt = tmp_path / "ibn.safetensors"
    ibnify.save(tiny_converted(), ckpt)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(flat / "x.png")
    result = CliRunner().invoke(
        cli,
        [
            *("finetune", str(ckpt), "--data", str(flat), "--out", str(tmp_path / "o")),
            *("--distill-from", "resnet18", "--quiet"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    # finetune has no --weights: the advice names what finetune takes (a local teacher file).
    assert "--weights" not in result.output and "--distill-from" in result.output
    assert not (tmp_path / "o").exists()
