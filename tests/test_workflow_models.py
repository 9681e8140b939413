"""Issue 17 workflows around model sources: whole torchvision detectors convert, every image model
torchvision's ``get_model`` knows builds by name, default input sizes, close-name suggestions."""

from __future__ import annotations

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import fx, nn

import ibnify
from ibnify.cli import cli
from ibnify.core.graph import analyze
from ibnify.core.ops import NormKind, is_norm, norm_kind
from ibnify.core.surgery import get_plan
from ibnify.core.tracing import check_codegen_safe
from ibnify.errors import ModelNotFoundError, NoBatchNormError, TraceError
from ibnify.models.registry import build_model, default_input_size, resolve_name

# Small inputs keep the detector's own transform (resize to min_size) cheap.
_DETECTOR_SIZE = {"min_size": 128, "max_size": 160}


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 128, 160, generator=generator) for _ in range(2)]


def _check_whole_detector(name: str) -> None:
    """Convert the whole detector: the ResNet body's bn1s become IBN (13 sites of IBN-a in
    stages 1-3), nothing outside ``backbone.body`` changes, and the forward on a list of
    images gives the same output structure as the original."""
    model = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, **_DETECTOR_SIZE
    )
    model.eval()
    converted = ibnify.convert(model)
    plan = get_plan(converted)
    assert len(plan.sites) == 13
    assert all(site.name.startswith("backbone.body.layer") for site in plan.sites)
    assert plan.sites[0].name == "backbone.body.layer1.0.bn1"
    # Every norm outside the body (the FPN and heads of the v2 models) stays, with its reason.
    head_norms = [n for n, m in model.named_modules() if is_norm(m) and "body." not in n]
    outside = {s.name: getattr(s.reason, "code", s.reason) for s in plan.skipped}
    assert {n: outside.get(n) for n in head_norms} == dict.fromkeys(head_norms, "outside_body")
    kinds = [norm_kind(m) for m in converted.modules()]
    assert kinds.count(NormKind.IBN) == 13
    assert not any(norm_kind(m) == NormKind.IBN for m in model.modules())  # caller's untouched
    with torch.no_grad():
        out, ref = converted.eval()(_images()), model(_images())
    assert isinstance(out, list) and len(out) == len(ref) == 2
    for got, want in zip(out, ref, strict=True):
        assert sorted(got) == sorted(want)
        assert got["boxes"].shape[1:] == want["boxes"].shape[1:] == (4,)


def test_whole_fasterrcnn_converts_its_resnet_body() -> None:
    _check_whole_detector("fasterrcnn_resnet50_fpn")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "fasterrcnn_resnet50_fpn_v2",
        "maskrcnn_resnet50_fpn",
        "maskrcnn_resnet50_fpn_v2",
        "keypointrcnn_resnet50_fpn",
        "retinanet_resnet50_fpn",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
    ],
)
def test_every_resnet_detector_converts(name: str) -> None:
    _check_whole_detector(name)


@pytest.mark.slow  # SSD300's VGG-16 holds 36 M parameters
def test_ssd_vgg_has_no_batchnorm_one_line() -> None:
    model, _ = build_model("tv:ssd300_vgg16")
    with pytest.raises(NoBatchNormError, match=r"^SSD has no BatchNorm layer \(it has no norm"):
        ibnify.plan(model)


class _Box:
    """A plain object handed between modules, like torchvision's ``ImageList``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _Unbox(nn.Module):
    def forward(self, box: _Box) -> torch.Tensor:
        return box.tensor


class _BoxNet(nn.Module):
    """fx cannot trace it (an object reaches a module), so analysis walks its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.unbox = _Unbox()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if x.sum() > float("-inf"):  # data-dependent: fx gives up
            x = self.unbox(_Box(x))
        return self.bn2(self.conv2(x))


def test_walk_of_an_object_argument_embeds_no_repr() -> None:
    analysis = analyze(_BoxNet(), (3, 16, 16), fallback=True)
    assert analysis.trace_error is not None  # fx failed, the walk described it
    assert [n.name for n in analysis.norms] == ["bn1", "bn2"]
    assert " at 0x" not in analysis.graph_module.code
    unbox = next(n for n in analysis.graph_module.graph.nodes if n.target == "unbox")
    assert unbox.args == (None,)  # the object is a gap, like a tensor with no producer


@pytest.mark.parametrize("nested", [False, True])
def test_graph_holding_an_object_is_refused_in_one_line(nested: bool) -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    box = _Box(torch.zeros(1))
    node = graph.call_function(torch.cat, ([x, (1, box)],)) if nested else None
    graph.output(graph.call_function(torch.add, (x, box)) if not nested else node)
    with pytest.raises(TraceError) as error:
        check_codegen_safe(graph, "Net")
    target = "cat" if nested else "add"
    assert str(error.value) == (
        f"the graph of Net passes a _Box object to '{target}', which generated code cannot hold"
    )


def test_every_torchvision_image_model_resolves_by_name() -> None:
    modules = (torchvision.models, torchvision.models.segmentation, torchvision.models.detection)
    names = [n for m in modules for n in torchvision.models.list_models(module=m)]
    assert len(names) >= 80 + 6 + 12
    assert all(resolve_name(f"tv:{n}") == f"tv:{n}" for n in names)
    for video in ("r3d_18", "raft_small", "quantized_resnet18"):  # not image models: refused
        with pytest.raises(ModelNotFoundError):
            resolve_name(f"tv:{video}")


def test_segmentation_and_detection_build_without_downloading(monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model, source = build_model("deeplabv3_resnet50")
    assert (type(model).__name__, source) == ("DeepLabV3", "tv:deeplabv3_resnet50")
    model, source = build_model("tv:fcos_resnet50_fpn")
    assert (type(model).__name__, source) == ("FCOS", "tv:fcos_resnet50_fpn")


def test_cli_plans_deeplab_by_name() -> None:
    result = CliRunner().invoke(cli, ["plan", "tv:deeplabv3_resnet50", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("ConversionPlan(tv:deeplabv3_resnet50, layout=resnet-a")
    assert lines[-1] == "13 sites; per stage: 1: 3, 2: 4, 3: 6; parameter delta +0"


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("tv:inception_v3", None, (3, 299, 299)),
        ("inception_v3", None, (3, 299, 299)),
        ("tv:vit_h_14", None, (3, 224, 224)),  # 518 belongs to weights that resize the model
        ("efficientnet_b3", None, (3, 300, 300)),
        ("tv:deeplabv3_resnet50", None, (3, 224, 224)),
        ("timm:inception_v3", None, (3, 299, 299)),
        ("timm:resnet18", {"in_chans": 1}, (1, 224, 224)),
        ("ibnify:digits_resnet", {"image_size": 8}, (3, 8, 8)),
    ],
)
def test_default_input_size_by_name(name: str, kwargs: dict | None, size: tuple) -> None:
    assert default_input_size(name, kwargs) == size


def test_default_input_size_of_a_module() -> None:
    assert default_input_size(torchvision.models.inception_v3(init_weights=False)) == (3, 299, 299)
    assert default_input_size(torchvision.models.resnet18()) == (3, 224, 224)
    # EfficientNet's builders disagree (224 ... 600): the class alone does not tell.
    assert default_input_size(torchvision.models.efficientnet_b0()) == (3, 224, 224)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "mobilenetv3",
            "unknown model 'mobilenetv3'; did you mean mobilenet_v3_large, mobilenet_v3_small, "
            "mobilenetv3_rw?",
        ),
        (
            "tv:mobilenetv3",
            "unknown model 'tv:mobilenetv3'; did you mean mobilenet_v3_large, "
            "mobilenet_v3_small, mobilenet_v2?",
        ),
        ("efficientnetb0", None),
        ("resnet_50", None),
    ],
)
def test_close_names_ignore_separators(name: str, message: str | None) -> None:
    with pytest.raises(ModelNotFoundError) as error:
        resolve_name(name)
    if message is not None:
        assert str(error.value) == message
    else:  # the spelling without separators comes first
        first = str(error.value).split("did you mean ")[1].split(",")[0]
        assert first == {"efficientnetb0": "efficientnet_b0", "resnet_50": "resnet50"}[name]
