"""The IBN layer: split sizes, numerics against a per-half computation, weight transfer."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from ibnify.core.layers import IBN, IBNAct, ibn_split_sizes, instance_norm_from_batchnorm
from tests.helpers import randomize_norms
from tests.reference_ibn import ReferenceIBN


def _random_bn(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    """An eval-mode BN with random affine and statistics, 7 batches tracked."""
    bn = randomize_norms(nn.BatchNorm2d(channels), seed=seed)
    bn.num_batches_tracked.fill_(7)
    return bn.eval()


def _valid(channels: int, ratio: float, order: str = "in_first") -> bool:
    try:
        ibn_split_sizes(channels, ratio, order)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(min_value=2, max_value=512),
    ratio=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
    order=st.sampled_from(["in_first", "bn_first"]),
)
def test_ibn_matches_per_half_computation(channels: int, ratio: float, order: str) -> None:
    assume(_valid(channels, ratio, order))
    layer = IBN(channels, ratio=ratio, order=order).train()  # type: ignore[arg-type]
    with torch.no_grad():
        layer.IN.weight.uniform_(0.5, 1.5)
        layer.IN.bias.normal_()
        layer.BN.weight.uniform_(0.5, 1.5)
        layer.BN.bias.normal_()
    x = torch.randn(2, channels, 3, 4)
    out = layer(x)

    in_ch, bn_ch = layer.in_channels, layer.bn_channels
    assert in_ch + bn_ch == channels and in_ch >= 1 and bn_ch >= 1
    if order == "in_first":
        assert in_ch == int(channels * ratio)
    else:
        assert bn_ch == int(channels * (1 - ratio))
    ins, bns = layer.in_slice(), layer.bn_slice()
    expected_in = F.instance_norm(x[:, ins], weight=layer.IN.weight, bias=layer.IN.bias, eps=1e-5)
    expected_bn = F.batch_norm(
        x[:, bns], None, None, layer.BN.weight, layer.BN.bias, training=True, eps=1e-5
    )
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, ins], expected_in, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, bns], expected_bn, atol=1e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(min_value=2, max_value=512),
    ratio=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
)
def test_in_first_split_equals_reference_rounding(channels: int, ratio: float) -> None:
    assume(_valid(channels, ratio))
    layer = IBN(channels, ratio)
    assert layer.IN.num_features == int(channels * ratio)
    assert layer.BN.num_features == channels - int(channels * ratio)
    assert layer.split_sizes == (layer.in_channels, layer.bn_channels)


@pytest.mark.parametrize(
    ("channels", "ratio"), [(1, 0.5), (2, 0.2), (10, 0.05), (64, 0.0), (64, 1.0), (64, -0.5)]
)
def test_invalid_split_raises_value_error_naming_c_and_ratio(channels: int, ratio: float) -> None:
    with pytest.raises(ValueError) as info:
        IBN(channels, ratio)
    assert f"C={channels}" in str(info.value) and f"ratio={ratio}" in str(info.value)


def test_nan_ratio_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        IBN(64, float("nan"))


def test_odd_channels_where_reference_split_breaks() -> None:
    # The reference code splits with torch.split(x, half): for C=5, ratio 0.3 → half=1 gives
    # chunks [1, 1, 1, 1, 1] and breaks; explicit sizes give [1, 4].
    layer = IBN(5, ratio=0.3)
    assert layer.split_sizes == (1, 4)
    x = torch.randn(3, 5, 4, 4)
    assert layer(x).shape == x.shape


def test_matches_authors_layer_numerically_and_by_keys() -> None:
    ours, reference = IBN(64), ReferenceIBN(64)
    assert list(ours.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 64, 6, 6)
    torch.testing.assert_close(ours(x), reference(x), atol=0, rtol=0)


def test_from_batchnorm_moves_every_tensor() -> None:
    bn = _random_bn(10).train()
    ibn = IBN.from_batchnorm(bn, ratio=0.3)
    assert (ibn.in_channels, ibn.bn_channels) == (3, 7)
    torch.testing.assert_close(ibn.IN.weight, bn.weight[:3])
    torch.testing.assert_close(ibn.IN.bias, bn.bias[:3])
    torch.testing.assert_close(ibn.BN.weight, bn.weight[3:])
    torch.testing.assert_close(ibn.BN.bias, bn.bias[3:])
    torch.testing.assert_close(ibn.BN.running_mean, bn.running_mean[3:])
    torch.testing.assert_close(ibn.BN.running_var, bn.running_var[3:])
    assert int(ibn.BN.num_batches_tracked) == 7
    assert ibn.training and ibn.IN.training and ibn.BN.training
    assert ibn.IN.track_running_stats is False and ibn.IN.running_mean is None


def test_from_batchnorm_bn_first_takes_the_leading_channels() -> None:
    bn = _random_bn(10)
    ibn = IBN.from_batchnorm(bn, ratio=0.4, order="bn_first")
    assert (ibn.bn_channels, ibn.in_channels) == (6, 4)
    torch.testing.assert_close(ibn.BN.running_mean, bn.running_mean[:6])
    torch.testing.assert_close(ibn.IN.weight, bn.weight[6:])
    assert not ibn.training


def test_eval_output_equals_batchnorm_when_sample_stats_equal_running_stats() -> None:
    """IN uses per-sample stats, BN running stats: equal them and both halves match the BN."""
    bn = _random_bn(12, seed=3)
    ibn = IBN.from_batchnorm(bn, ratio=0.5).eval()
    z = torch.randn(2, 12, 8, 8)
    z = (z - z.mean(dim=(2, 3), keepdim=True)) / z.std(dim=(2, 3), unbiased=False, keepdim=True)
    x = z * bn.running_var.sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
    torch.testing.assert_close(ibn(x), bn(x), atol=1e-4, rtol=0)


def test_ibnact_keeps_the_activation_of_batchnormact() -> None:
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(8, act_layer=nn.ReLU)
    ibn = IBNAct.from_batchnorm(bn, ratio=0.5)
    assert isinstance(ibn.act, nn.ReLU)
    out = ibn.eval()(torch.randn(2, 8, 5, 5) * 10)
    assert out.min() >= 0  # the ReLU is still applied
    assert set(ibn.state_dict()) == {
        f"{h}.{k}"
        for h, k in [
            ("IN", "weight"),
            ("IN", "bias"),
            ("BN", "weight"),
            ("BN", "bias"),
            ("BN", "running_mean"),
            ("BN", "running_var"),
            ("BN", "num_batches_tracked"),
        ]
    }


def test_instance_norm_from_batchnorm_takes_gamma_beta() -> None:
    bn = _random_bn(6)
    norm = instance_norm_from_batchnorm(bn)
    assert type(norm) is nn.InstanceNorm2d and norm.affine and not norm.track_running_stats
    torch.testing.assert_close(norm.weight, bn.weight)
    assert set(norm.state_dict()) == {"weight", "bias"}


def test_usable_as_norm_layer_factory_and_repr_is_one_line() -> None:
    import torchvision

    model = torchvision.models.resnet18(norm_layer=functools.partial(IBN, ratio=0.5))
    assert isinstance(model.layer1[0].bn1, IBN)
    assert "\n" not in repr(model.bn1) and repr(model.bn1).startswith("IBN(64, ratio=0.5")


def test_deepcopy_and_dtype_device_follow_batchnorm() -> None:
    bn = _random_bn(8).double()
    ibn = IBN.from_batchnorm(bn)
    assert ibn.IN.weight.dtype == torch.float64 and ibn.BN.running_mean.dtype == torch.float64
    clone = copy.deepcopy(ibn)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(clone(x), ibn(x), atol=0, rtol=0)
