"""Weight transfer, per layer kind and layout, on values where a dropped or mis-sliced tensor shows.

Every BatchNorm here has random affine and statistics, a non-default ``eps`` and ``momentum`` and
a non-zero ``num_batches_tracked``: a conversion that leaves any of them at its default, takes
the wrong slice, or swaps two of them gives another number. Outputs are compared with the
per-half formula written out here (float32, tolerance 1e-5).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import ibnify
from ibnify.cli import cli
from ibnify.core import get_plan
from ibnify.core.layers import IBN, IBNAct, InstanceNormAct2d, instance_norm_from_batchnorm
from ibnify.core.reasons import Reason, ReasonCode
from ibnify.errors import CheckpointError, WeightsError
from ibnify.models.weights import load_state_dict_file, load_weights

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, MOMENTUM, TRACKED = 1e-2, 0.03, 11
SMALL = (3, 64, 64)


def _fill(bn: nn.Module, seed: int) -> nn.Module:
    """Random gamma, beta, mean, var (all distinct) and ``TRACKED`` batches, in place."""
    g = torch.Generator().manual_seed(seed)
    channels = bn.running_mean.numel()
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(channels, generator=g))
        bn.bias.copy_(torch.rand(channels, generator=g) - 0.5)
        bn.running_mean.copy_(torch.rand(channels, generator=g) - 0.5)
        bn.running_var.copy_(0.3 + 2 * torch.rand(channels, generator=g))
        if getattr(bn, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked.fill_(TRACKED)
    return bn


def _norm(kind: str, channels: int) -> nn.Module:
    """A BN of ``kind`` with eps ``EPS`` (and momentum ``MOMENTUM`` where it has one)."""
    if kind == "batchnorm":
        bn: nn.Module = nn.BatchNorm2d(channels, eps=EPS, momentum=MOMENTUM)
    elif kind == "sync":
        bn = nn.SyncBatchNorm(channels, eps=EPS, momentum=MOMENTUM)
    elif kind == "frozen":
        bn = FrozenBatchNorm2d(channels, eps=EPS)
    elif kind == "timm_act":
        bn = BatchNormAct2d(
            channels, eps=EPS, momentum=MOMENTUM, act_layer=nn.LeakyReLU, drop_layer=nn.Dropout
        )
        bn.act.negative_slope = 0.3
        bn.drop.p = 0.25
    else:  # timm_frozen_act
        bn = FrozenBatchNormAct2d(channels, eps=EPS, act_layer=nn.LeakyReLU)
        bn.act.negative_slope = 0.3
    return _fill(bn, seed=len(kind) + channels)


KINDS = ["batchnorm", "sync", "frozen", "timm_act", "timm_frozen_act"]
# (channels, ratio, order, IN channels as slice, BN channels as slice): uneven halves both ways.
SPLITS = [
    (10, 0.3, "in_first", slice(0, 3), slice(3, 10)),
    (10, 0.4, "bn_first", slice(6, 10), slice(0, 6)),
]


def _tail(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The activation a timm norm+act layer applies after normalising (eval: no dropout)."""
    return bn.act(y) if hasattr(bn, "act") else y


def _expected_eval(x: torch.Tensor, bn: nn.Module, ins: slice, bns: slice) -> torch.Tensor:
    """IN with the BN's gamma/beta on ``ins``, the BN's eval formula on ``bns``, then its tail."""
    out = torch.empty_like(x)
    out[:, ins] = F.instance_norm(x[:, ins], weight=bn.weight[ins], bias=bn.bias[ins], eps=EPS)
    scale = bn.weight[bns] / torch.sqrt(bn.running_var[bns] + EPS)
    shift = bn.bias[bns] - bn.running_mean[bns] * scale
    out[:, bns] = x[:, bns] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return _tail(bn, out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("channels", "ratio", "order", "ins", "bns"), SPLITS)
def test_every_tensor_and_hyper_parameter_reaches_its_half(
    kind: str, channels: int, ratio: float, order: str, ins: slice, bns: slice
) -> None:
    bn = _norm(kind, channels).eval()
    before = copy.deepcopy(bn.state_dict())
    cls = IBNAct if kind.startswith("timm") else IBN
    ibn = cls.from_batchnorm(bn, ratio=ratio, order=order)  # type: ignore[arg-type]
    assert type(ibn) is cls
    frozen = kind in ("frozen", "timm_frozen_act")
    assert type(ibn.BN) is {
        "batchnorm": nn.BatchNorm2d,
        "sync": nn.SyncBatchNorm,
        "timm_act": nn.BatchNorm2d,
    }.get(kind, FrozenBatchNorm2d)
    assert (ibn.in_slice(), ibn.bn_slice()) == (ins, bns)
    exact = {"atol": 0, "rtol": 0}
    torch.testing.assert_close(ibn.IN.weight.detach(), bn.weight.detach()[ins], **exact)
    torch.testing.assert_close(ibn.IN.bias.detach(), bn.bias.detach()[ins], **exact)
    torch.testing.assert_close(ibn.BN.weight.detach(), bn.weight.detach()[bns], **exact)
    torch.testing.assert_close(ibn.BN.bias.detach(), bn.bias.detach()[bns], **exact)
    torch.testing.assert_close(ibn.BN.running_mean, bn.running_mean[bns], **exact)
    torch.testing.assert_close(ibn.BN.running_var, bn.running_var[bns], **exact)
    assert ibn.IN.eps == EPS and ibn.BN.eps == EPS
    assert ibn.IN.affine and not ibn.IN.track_running_stats
    if not frozen:
        assert int(ibn.BN.num_batches_tracked) == TRACKED
        assert ibn.BN.momentum == MOMENTUM
        assert ibn.BN.affine and ibn.BN.track_running_stats
    if kind.startswith("timm"):
        assert type(ibn.act) is nn.LeakyReLU and ibn.act.negative_slope == 0.3
        assert ibn.act is not bn.act, "the activation is copied, not shared"
    if kind == "timm_act":
        assert type(ibn.drop) is nn.Dropout and ibn.drop.p == 0.25
    assert not ibn.training and not ibn.IN.training and not ibn.BN.training
    x = torch.randn(3, channels, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.7
    with torch.no_grad():
        torch.testing.assert_close(ibn(x), _expected_eval(x, bn, ins, bns), atol=1e-5, rtol=1e-5)
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the source BN is untouched"


@pytest.mark.parametrize("training", [True, False])
def test_train_mode_and_frozen_parameters_follow_the_batchnorm(training: bool) -> None:
    bn = _norm("batchnorm", 10).train(training)
    bn.weight.requires_grad_(False)
    ibn = IBN.from_batchnorm(bn, ratio=0.3)
    assert [m.training for m in (ibn, ibn.IN, ibn.BN)] == [training] * 3
    grads = {name: p.requires_grad for name, p in ibn.named_parameters()}
    assert grads == {"IN.weight": False, "IN.bias": True, "BN.weight": False, "BN.bias": True}


def test_train_mode_bn_half_updates_its_statistics_with_the_copied_momentum() -> None:
    """In train mode the BN half moves its running mean by ``momentum`` of the batch mean."""
    bn = _norm("batchnorm", 10).train()
    ibn = IBN.from_batchnorm(bn, ratio=0.3)
    x = torch.randn(4, 10, 3, 3, generator=torch.Generator().manual_seed(2)) + 1.5
    ibn(x)
    batch_mean = x[:, 3:].mean(dim=(0, 2, 3))
    expected = (1 - MOMENTUM) * bn.running_mean[3:] + MOMENTUM * batch_mean
    torch.testing.assert_close(ibn.BN.running_mean, expected, atol=1e-6, rtol=1e-6)
    assert int(ibn.BN.num_batches_tracked) == TRACKED + 1


@pytest.mark.parametrize("kind", ["batchnorm", "timm_act"])
def test_ibn_b_stem_instance_norm_takes_gamma_beta_eps_and_keeps_the_act(kind: str) -> None:
    bn = _norm(kind, 6).eval()
    norm = instance_norm_from_batchnorm(bn)
    assert type(norm) is (InstanceNormAct2d if kind == "timm_act" else nn.InstanceNorm2d)
    torch.testing.assert_close(norm.weight.detach(), bn.weight.detach(), atol=0, rtol=0)
    torch.testing.assert_close(norm.bias.detach(), bn.bias.detach(), atol=0, rtol=0)
    assert norm.eps == EPS and norm.affine and not norm.track_running_stats
    assert not norm.training
    x = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(3)) * 3
    expected = _tail(bn, F.instance_norm(x, weight=bn.weight, bias=bn.bias, eps=EPS))
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    for index, module in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        _fill(module, seed + index)
        module.eps, module.momentum = EPS, MOMENTUM
    return model


def test_resnet_ibn_b_moves_the_stem_and_adds_fresh_post_addition_ins() -> None:
    original = _randomized(torchvision.models.resnet18()).eval()
    converted = ibnify.convert(original, layout="b", input_size=SMALL)
    stem = converted.bn1
    assert type(stem) is nn.InstanceNorm2d and stem.eps == EPS
    torch.testing.assert_close(stem.weight.detach(), original.bn1.weight.detach(), atol=0, rtol=0)
    torch.testing.assert_close(stem.bias.detach(), original.bn1.bias.detach(), atol=0, rtol=0)
    # the reference's post-addition IN is a fresh affine InstanceNorm2d (gamma 1, beta 0)
    for name, channels in (("layer1.1.IN", 64), ("layer2.1.IN", 128)):
        post = converted.get_submodule(name)
        assert type(post) is nn.InstanceNorm2d and post.num_features == channels
        assert torch.equal(post.weight.detach(), torch.ones(channels))
        assert torch.equal(post.bias.detach(), torch.zeros(channels))
    # every other BN is copied unchanged, eps and momentum included
    for name, module in original.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name != "bn1":
            new = converted.get_submodule(name)
            assert (new.eps, new.momentum) == (EPS, MOMENTUM)
            pairs = zip(module.state_dict().values(), new.state_dict().values(), strict=True)
            assert all(torch.equal(a, b) for a, b in pairs)


def test_densenet_reversed_order_sites_take_the_leading_channels_for_bn() -> None:
    original = _randomized(torchvision.models.densenet121()).eval()
    converted = ibnify.convert(original, input_size=SMALL)
    sites = get_plan(converted).sites
    assert len(sites) == 14
    for site in sites[:3]:
        bn, ibn = original.get_submodule(site.name), converted.get_submodule(site.name)
        c = bn.num_features
        bns, ins = slice(0, int(c * 0.6)), slice(int(c * 0.6), c)
        assert (ibn.bn_slice(), ibn.in_slice()) == (bns, ins)
        for half, part, names in (
            (ibn.BN, bns, ("weight", "bias", "running_mean", "running_var")),
            (ibn.IN, ins, ("weight", "bias")),
        ):
            for tensor in names:
                assert torch.equal(
                    getattr(half, tensor).detach(), getattr(bn, tensor).detach()[part]
                )
        assert int(ibn.BN.num_batches_tracked) == TRACKED
        assert (ibn.BN.eps, ibn.BN.momentum, ibn.IN.eps) == (EPS, MOMENTUM, EPS)


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("layout", ["a", "b"])
def test_convert_and_plan_keep_each_submodules_mode_and_leave_the_model_alone(layout: str) -> None:
    """A frozen stage (eval) inside a training model: each module keeps its own flag."""
    model = _randomized(torchvision.models.resnet18()).train()
    model.layer1.eval()
    model.layer2[1].bn1.eval()
    model.layer3[0].bn1.weight.requires_grad_(False)
    modes = _modes(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    ibnify.plan(model, layout=layout, input_size=SMALL)
    converted = ibnify.convert(model, layout=layout, input_size=SMALL)
    assert _modes(model) == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.BatchNorm2d) for m in (model.bn1, model.layer1[0].bn1))
    after = _modes(converted)
    for name, training in modes.items():
        if name in after:
            assert after[name] == training, name
    sites = get_plan(converted).sites
    for site in sites:
        was = modes.get(site.name, modes[site.name.rpartition(".")[0]])  # a new IN: its block's
        new = converted.get_submodule(site.name)
        assert all(m.training == was for m in new.modules()), site.name
    if layout == "a":
        ibn = converted.layer3[0].bn1
        assert not ibn.IN.weight.requires_grad and not ibn.BN.weight.requires_grad
        assert ibn.IN.bias.requires_grad and ibn.BN.bias.requires_grad
    else:  # the post-addition IN of the frozen layer1 block is in eval mode, layer2's trains
        assert not converted.layer1[1].IN.training and converted.layer2[1].IN.training


class _Exploit:
    """A pickle that would create ``marker`` when unpickled by an unsafe loader."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(tmp_path: Path, name: str) -> Path:
    """A torch.save file holding a tensor beside an object whose unpickling touches a file."""
    path = tmp_path / name
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Exploit(tmp_path / "pwned")}, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_convert_weights_of_each_suffix_refuse_a_crafted_pickle(tmp_path, suffix: str) -> None:
    weights, out = _crafted(tmp_path, "evil" + suffix), tmp_path / "out.safetensors"
    args = ["convert", "resnet18", "--weights", str(weights), "-o", str(out), "--input-size", "64"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: refusing to load")
    assert not (tmp_path / "pwned").exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil" + suffix]


def test_plain_containers_with_non_tensor_leaves_are_not_weights(tmp_path) -> None:
    """weights_only=True lets ints and strings through: the loader still refuses them."""
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"conv1.weight": torch.ones(1), "step": 3}, "note": "x"}, path)
    with pytest.raises(WeightsError, match="not plain weights: entry 'state_dict' is a dict"):
        load_state_dict_file(path)


@pytest.mark.parametrize("command", ["load", "export", "evaluate"])
def test_a_pickle_given_as_a_checkpoint_is_refused_unread(tmp_path, command: str) -> None:
    evil = _crafted(tmp_path, "model.safetensors")
    if command == "load":
        with pytest.raises(CheckpointError, match="not a valid safetensors checkpoint"):
            ibnify.load(evil)
    else:
        args = {
            "export": ["export", str(evil), "-o", str(tmp_path / "m.onnx")],
            "evaluate": ["evaluate", str(evil), "--dataset", "digits"],
        }[command]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and result.output.startswith("error: ")
        assert result.output.count("\n") == 1 and "safetensors" in result.output
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_weights_that_do_not_fit_are_refused_with_every_kind_of_mismatch_counted() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    wrong_shape = {**good, "0.weight": torch.zeros(3, 2, 3, 3)}
    with pytest.raises(WeightsError, match=r"^w: .*Sequential: 1 wrong shape \(0\.weight\)$"):
        load_weights(model, wrong_shape, what="w")
    extra = {**good, "2.a": torch.zeros(1), "2.b": torch.zeros(1), "2.c": torch.zeros(1)}
    del extra["1.running_var"], extra["0.bias"], extra["1.bias"], extra["1.weight"]
    with pytest.raises(WeightsError) as error:
        load_weights(model, extra, what="w")
    assert str(error.value).endswith(
        "4 missing (0.bias, 1.weight, 1.bias, ...); 3 unexpected (2.a, 2.b, 2.c)"
    )
    assert all(
        not torch.equal(v, torch.full_like(v, 0.5))
        for v in model.state_dict().values()
        if v.is_floating_point()
    ), "nothing was loaded from a refused state"
    load_weights(model, good)
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


def test_timm_norm_act_sites_of_a_whole_model_keep_their_own_activation_and_slices() -> None:
    original = timm.create_model("mobilenetv3_small_050").eval()
    for index, module in enumerate(m for m in original.modules() if isinstance(m, BatchNormAct2d)):
        _fill(module, index)
        module.eps, module.momentum = EPS, MOMENTUM
    converted = ibnify.convert(original, input_size=SMALL)
    sites = get_plan(converted).sites
    acts = {type(original.get_submodule(s.name).act) for s in sites}
    assert len(sites) == 7 and acts == {nn.ReLU, nn.Hardswish}, "both activations are covered"
    for site in sites:
        bn, ibn = original.get_submodule(site.name), converted.get_submodule(site.name)
        assert type(ibn) is IBNAct and type(ibn.act) is type(bn.act)
        half = site.in_channels
        for name in ("weight", "bias"):
            assert torch.equal(getattr(ibn.IN, name).detach(), getattr(bn, name).detach()[:half])
            assert torch.equal(getattr(ibn.BN, name).detach(), getattr(bn, name).detach()[half:])
        assert torch.equal(ibn.BN.running_mean, bn.running_mean[half:])
        assert torch.equal(ibn.BN.running_var, bn.running_var[half:])
        assert (ibn.BN.eps, ibn.BN.momentum, int(ibn.BN.num_batches_tracked)) == (
            EPS,
            MOMENTUM,
            TRACKED,
        )
        x = torch.randn(2, bn.num_features, 4, 4) * 3
        with torch.no_grad():
            torch.testing.assert_close(
                ibn(x), _expected_eval(x, bn, slice(0, half), slice(half, None))
            )


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class _Slices(nn.Module):
    """``cut``'s 16 channels are sliced to their first 8 (the slice cuts its IN and BN parts);
    ``whole``'s 8 channels sit at 4:12 of a concat sliced at 4: one slice ends exactly where
    they begin, the other takes them whole."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 2)
        self.a, self.b = _conv_bn(8, 8), _conv_bn(8, 8)
        self.cut, self.after_cut = _conv_bn(16, 16), _conv_bn(8, 8)
        self.other, self.whole = _conv_bn(8, 4), _conv_bn(8, 8)
        self.left, self.right = _conv_bn(4, 8), _conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        y = self.after_cut(self.cut(x)[:, :8])
        z = torch.cat([self.other(y), self.whole(y)], dim=1)
        return torch.cat([self.left(z[:, :4]), self.right(z[:, 4:])], dim=1)


class _Residual(nn.Module):
    """A residual block with a conv+BN shortcut: bn1 may take IN, bn2 and the shortcut BN not."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(cin, 16, 1, 2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.down(x))


def test_generic_rule_refuses_a_cut_slice_and_accepts_slices_that_miss_or_take_all() -> None:
    plan = ibnify.plan(_Slices(), stages=(1,), input_size=(3, 32, 32))
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons == {
        "stem.1": Reason(ReasonCode.STEM),
        "cut.1": Reason(ReasonCode.SLICE_CUTS, at="getitem"),
    }
    assert [s.name for s in plan.sites] == [
        "a.1",
        "b.1",
        "after_cut.1",
        "other.1",
        "whole.1",
        "left.1",
        "right.1",
    ]


def test_generic_rule_names_the_shortcut_and_the_residual_scale_bn() -> None:
    model = nn.Sequential(_conv_bn(3, 8, 2), _Residual(8), _Residual(16))
    plan = ibnify.plan(model, stages=(1, 2), input_size=(3, 32, 32))
    assert [(s.name, s.stage) for s in plan.sites] == [("1.bn1", 1), ("2.bn1", 2)]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons == {
        "0.1": Reason(ReasonCode.STEM),
        "1.bn2": Reason(ReasonCode.SETS_RESIDUAL_SCALE, at="1"),
        "1.down.1": Reason(ReasonCode.SHORTCUT, at="1"),
        "2.bn2": Reason(ReasonCode.SETS_RESIDUAL_SCALE, at="2"),
        "2.down.1": Reason(ReasonCode.SHORTCUT, at="2"),
    }
