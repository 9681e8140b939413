"""`--method entropy` / `OnlineAdapter`: TENT-style learning of the BN and/or IN affine.

Tiny models with random (non-trivial) affine parameters and statistics, a few images. One
update is compared with an SGD step on the gradient of a hand-written forward (IN per image, BN
over the batch, the entropy of the softmax, EATA's margin), parameter by parameter; every other
tensor must stay bit-identical. The collapse guard is checked on a model that reads the class
from where the bright quadrant is, so a one-class target gives confident one-class predictions.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.ops.misc import FrozenBatchNorm2d

import ibnify
from ibnify.adaptation import AdaptOptions, CollapseGuard, OnlineAdapter, prediction_entropy
from ibnify.adaptation.offline import adapt_with
from ibnify.core.layers import IBN
from ibnify.data.images import ImageData
from ibnify.errors import InvalidOptionError
from ibnify.models.registry import build_model
from tests.helpers import randomize_norms

GUARD_LOGGER = "ibnify.adaptation.entropy"


class TinyIBN(nn.Module):
    """conv → IBN (IN on 2 channels, BN on 2) → ReLU → mean → linear, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = IBN(4, ratio=0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).relu().mean(dim=(2, 3)))


def _tiny_ibn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(TinyIBN(), seed=1)


def _images(count: int, seed: int = 0, size: int = 6) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _data(x: torch.Tensor) -> ImageData:
    labels = torch.zeros(len(x), dtype=torch.long)
    return ImageData(TensorDataset(x, labels), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), labelled=False)


def _hand_forward(model: TinyIBN, x: torch.Tensor, affine: dict[str, torch.Tensor]) -> torch.Tensor:
    """TinyIBN by hand: IN over each image's H×W, BN over the batch (biased variance)."""
    eps = 1e-5
    y = model.conv(x).detach()
    first, second = y[:, :2], y[:, 2:]

    def scale(t: torch.Tensor, dims: tuple[int, ...], w: torch.Tensor, b: torch.Tensor):
        mean = t.mean(dim=dims, keepdim=True)
        var = t.var(dim=dims, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    a = scale(first, (2, 3), affine["norm.IN.weight"], affine["norm.IN.bias"])
    b = scale(second, (0, 2, 3), affine["norm.BN.weight"], affine["norm.BN.bias"])
    pooled = torch.cat((a, b), dim=1).relu().mean(dim=(2, 3))
    return pooled @ model.head.weight.detach().T + model.head.bias.detach()


def _hand_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=1)
    return -(p * torch.log(p)).sum(dim=1)


def test_prediction_entropy_and_its_gradient_on_a_hand_case() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [2.0, -1.0]], requires_grad=True)
    entropy = prediction_entropy(logits)
    p = 0.75
    expected = [-(p * math.log(p) + (1 - p) * math.log(1 - p)), math.log(2.0)]
    torch.testing.assert_close(entropy[:2].detach(), torch.tensor(expected), rtol=0, atol=1e-6)
    entropy.sum().backward()
    probabilities = torch.softmax(logits.detach(), dim=1)
    # dH/dz_j = -p_j (log p_j + H)
    closed = -probabilities * (probabilities.log() + entropy.detach().unsqueeze(1))
    torch.testing.assert_close(logits.grad, closed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norms", ["bn", "in", "both"])
def test_one_step_is_the_hand_computed_entropy_gradient_step(norms: str) -> None:
    model, x, lr = _tiny_ibn(), _images(8), 0.5
    learn = {"bn": ["norm.BN.weight", "norm.BN.bias"], "in": ["norm.IN.weight", "norm.IN.bias"]}
    chosen = learn["bn"] + learn["in"] if norms == "both" else learn[norms]
    source = {k: v.detach().clone() for k, v in model.named_parameters()}
    affine = {k: source[k].clone().requires_grad_(True) for k in learn["bn"] + learn["in"]}
    entropy = _hand_entropy(_hand_forward(model, x, affine))
    ordered = entropy.detach().sort().values
    margin = float(ordered[3] + ordered[4]) / 2  # EATA's filter keeps the 4 most confident
    loss = entropy[entropy.detach() < margin].mean()
    grads = dict(zip(affine, torch.autograd.grad(loss, list(affine.values())), strict=True))
    options = AdaptOptions(
        batch_size=8, method="entropy", norms=norms, steps=1, lr=lr, e_margin=margin / math.log(3)
    )
    adapted = adapt_with(model, _data(x), options)
    record = ibnify.adaptation.adaptations(adapted)[-1]
    assert (record["norms"], record["updates"], record["kept"], record["seen"]) == (norms, 1, 4, 8)
    for name, parameter in adapted.named_parameters():
        if name in chosen:  # SGD's first step with momentum is a plain step: p - lr * grad
            expected = source[name] - lr * grads[name]
            torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-6)
            assert not torch.allclose(parameter, source[name], rtol=0, atol=1e-4), name
        else:
            assert torch.equal(parameter, source[name]), name
    # then the statistics, as `bn` re-estimates them: one batch, its mean and unbiased variance
    conv = model.conv(x).detach()[:, 2:].double()
    flat = conv.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(
        adapted.norm.BN.running_mean.double(), flat.mean(1), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(adapted.norm.BN.running_var.double(), flat.var(1), atol=1e-6, rtol=0)
    before = model.state_dict()
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {*chosen, "norm.BN.running_mean", "norm.BN.running_var"}


def test_modes_flags_and_the_input_model_come_back_as_they_were() -> None:
    model = _tiny_ibn()
    model.train()
    model.head.eval()
    model.conv.weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    for method in ("bn", "entropy"):
        adapted = ibnify.adapt(
            model,
            _data(_images(8)),
            method=method,
            batch_size=4,
            **({"lr": 0.5} if method == "entropy" else {}),
        )
        modes = {name: m.training for name, m in model.named_modules()}
        assert {name: m.training for name, m in adapted.named_modules()} == modes, method
        assert modes[""] and not modes["head"] and modes["norm.BN"]
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        assert {n: p.requires_grad for n, p in adapted.named_parameters()} == flags, method
        assert all(p.grad is None for p in adapted.parameters())
        assert adapted.norm.BN.track_running_stats
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), (method, key)
        assert model.conv.weight.grad is None and model.norm.IN.weight.grad is None
    eval_model = _tiny_ibn().eval()
    adapted = ibnify.adapt(eval_model, _data(_images(8)), method="entropy", batch_size=4)
    assert not any(m.training for m in adapted.modules())


def test_a_seeded_run_is_reproducible_and_draws_on_no_global_generator() -> None:
    model, data = _tiny_ibn(), _data(_images(12))
    global_state = torch.get_rng_state()

    def run(seed: int) -> dict[str, torch.Tensor]:
        options = AdaptOptions(
            batch_size=4, seed=seed, method="entropy", epochs=2, lr=0.5, e_margin=1.0
        )
        adapted = adapt_with(model, data, options)
        assert ibnify.adaptation.adaptations(adapted)[-1]["updates"] == 6
        return adapted.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["norm.IN.weight"], other["norm.IN.weight"])  # order matters
    assert torch.equal(torch.get_rng_state(), global_state)


def test_steps_and_epochs_count_updates() -> None:
    model, data = _tiny_ibn(), _data(_images(12))
    record = ibnify.adaptation.adaptations(
        adapt_with(
            model,
            data,
            AdaptOptions(batch_size=4, method="entropy", epochs=3, lr=0.1, e_margin=1.0),
        )
    )[-1]
    assert (record["epochs"], record["seen"], record["updates"], record["kept"]) == (3, 36, 9, 36)
    default = ibnify.adapt(model, data, method="entropy", epochs=3, batch_size=4)
    record = ibnify.adaptation.adaptations(default)[-1]  # near-uniform predictions: filtered
    assert (record["seen"], record["updates"], record["kept"]) == (36, 0, 0)
    capped = adapt_with(
        model,
        data,
        AdaptOptions(batch_size=4, method="entropy", epochs=3, steps=2, lr=0.1, e_margin=1.0),
    )
    record = ibnify.adaptation.adaptations(capped)[-1]
    assert (record["steps"], record["updates"], record["seen"]) == (2, 2, 8)


class Quadrants(nn.Module):
    """Class k = the bright quadrant k of a 4×4 image: conv 1×1 → BN → 2×2 pools → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.weight.copy_(0.5 + torch.rand(2, 3, 1, 1))
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.zeros(4, 8))
            self.head.bias.zero_()
            for k in range(4):
                self.head.weight[k, k] = self.head.weight[k, 4 + k] = 4.0
        randomize_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.avg_pool2d(self.bn(self.conv(x)), 2)
        return self.head(y.flatten(1))


def _quadrant_images(classes: list[int], seed: int = 0) -> torch.Tensor:
    x = 0.1 + 0.05 * torch.rand(
        len(classes), 3, 4, 4, generator=torch.Generator().manual_seed(seed)
    )
    for index, k in enumerate(classes):
        row, col = divmod(k, 2)
        x[index, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] = 1.0
    return x


def test_the_collapse_guard_fires_once_on_a_one_class_target(caplog) -> None:
    torch.manual_seed(0)
    model = Quadrants()
    balanced = _quadrant_images([k % 4 for k in range(32)])
    one_class = _quadrant_images([2] * 32)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        calm = ibnify.adapt(model, _data(balanced), method="entropy", batch_size=8)
    assert [r for r in caplog.records if r.name == GUARD_LOGGER] == []
    assert ibnify.adaptation.adaptations(calm)[-1]["mean_prediction_entropy"] > 0.9 * math.log(4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        collapsed = ibnify.adapt(model, _data(one_class), method="entropy", batch_size=8)
    records = [r for r in caplog.records if r.name == GUARD_LOGGER]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert records[0].getMessage().startswith("adaptation collapse: the mean prediction over 32")
    value = ibnify.adaptation.adaptations(collapsed)[-1]["mean_prediction_entropy"]
    assert value < 0.5 * math.log(4)
    with torch.no_grad():  # the adapted model does read the one class: quadrant 2
        assert collapsed.eval()(one_class).argmax(1).eq(2).all()


def test_collapse_guard_entropy_of_the_mean_prediction_by_hand(caplog) -> None:
    guard = CollapseGuard(0.5)
    guard.add(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]))  # p = (.75, .25), (.5, .5)
    mean = (0.625, 0.375)
    hand = -sum(p * math.log(p) for p in mean)
    assert guard.entropy() == pytest.approx(hand, abs=1e-8)  # ln 3 held as a float32 logit
    assert guard.threshold() == pytest.approx(0.5 * math.log(2), abs=1e-12)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        assert not guard.check()
        guard.add(torch.tensor([[12.0, 0.0]] * 40))
        assert guard.check() and guard.check()  # still collapsed; warned once
        assert len([r for r in caplog.records if r.name == GUARD_LOGGER]) == 1
        assert not guard.check(minimum=100)  # too few images yet to judge
        guard.reset()
        guard.add(torch.tensor([[12.0, 0.0]] * 4))
        assert guard.check()
    assert len([r for r in caplog.records if r.name == GUARD_LOGGER]) == 2


def test_online_adapter_adapts_batch_by_batch_and_reset_restores_the_source_bit_for_bit() -> None:
    model = _tiny_ibn()
    before = copy.deepcopy(model.state_dict())
    adapter = OnlineAdapter(model, lr=0.5, e_margin=1.0)
    source = copy.deepcopy(adapter.model.state_dict())
    batches = [_images(8, seed) for seed in (1, 2, 3)]
    affine = {k: source[k].clone().requires_grad_(True) for k in adapter.parameter_names}
    first = adapter(batches[0])
    torch.testing.assert_close(
        first, _hand_forward(model, batches[0], affine).detach(), rtol=0, atol=1e-5
    )  # the logits before the update
    for batch in batches[1:]:
        adapter(batch)
    state = adapter.model.state_dict()
    assert adapter.updates == 3 and adapter.images == 24
    assert sorted(k for k in state if not torch.equal(state[k], source[k])) == sorted(
        ["norm.BN.weight", "norm.BN.bias", "norm.IN.weight", "norm.IN.bias"]
    )  # BN running statistics untouched online: each batch normalises with its own
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    assert (adapter.updates, adapter.images) == (0, 0)
    fresh = OnlineAdapter(model, lr=0.5, e_margin=1.0)
    for batch in batches[:2]:  # the second step shows the momentum was cleared too
        assert torch.equal(adapter(batch), fresh(batch))
    assert all(
        torch.equal(v, fresh.model.state_dict()[k]) for k, v in adapter.model.state_dict().items()
    )
    offline = adapt_with(
        model,
        _data(batches[0]),
        AdaptOptions(batch_size=8, method="entropy", steps=1, lr=0.5, e_margin=1.0),
    )
    single = OnlineAdapter(model, lr=0.5, e_margin=1.0)
    single(batches[0])
    for name in single.parameter_names:  # the same step (offline shuffles within the batch)
        torch.testing.assert_close(
            single.model.get_parameter(name), offline.get_parameter(name), rtol=0, atol=1e-6
        )
    with pytest.raises(InvalidOptionError, match="at least 2 images"):
        adapter(batches[0][:1])


def test_norm_choices_and_models_with_nothing_to_learn() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    plain(_images(2))
    data = _data(_images(8))
    adapted = ibnify.adapt(plain, data, method="entropy", norms="both", batch_size=4)
    assert ibnify.adaptation.adaptations(adapted)[-1]["norms"] == "bn"  # both = bn without IN
    with pytest.raises(InvalidOptionError, match=r"no InstanceNorm with affine.*use norms 'bn'"):
        ibnify.adapt(plain, data, method="entropy", norms="in")
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(InvalidOptionError, match=r"frozen.*use method 'bn'"):
        ibnify.adapt(frozen, data, method="entropy")
    no_affine = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(64, 3)
    )
    with pytest.raises(InvalidOptionError, match="no BatchNorm or InstanceNorm with affine"):
        ibnify.adapt(no_affine, data, method="entropy")
    with pytest.raises(InvalidOptionError, match="lr must be a positive number"):
        ibnify.adapt(_tiny_ibn(), data, method="entropy", lr=0)
    with pytest.raises(InvalidOptionError, match="epochs, lr apply to method 'entropy' only"):
        ibnify.adapt(_tiny_ibn(), data, lr=0.1, epochs=2)
    with pytest.raises(InvalidOptionError, match="unknown adaptation method 'tent'"):
        ibnify.adapt(_tiny_ibn(), data, method="tent")


def test_entropy_adapted_ibn_model_exports_and_verifies(tmp_path) -> None:
    torch.manual_seed(0)
    base, source = build_model("ibnify:digits_resnet", width=4)
    converted = randomize_norms(
        ibnify.convert(base, stages=(1, 2), arch=source, model_kwargs={"width": 4})
    )
    x = _images(16, size=16)
    options = AdaptOptions(batch_size=8, method="entropy", epochs=2, lr=0.5, e_margin=1.0)
    adapted = adapt_with(converted, _data(x), options)
    ibn = adapted.layer1[0].bn1
    assert not torch.equal(ibn.IN.weight, converted.layer1[0].bn1.IN.weight)
    assert not torch.equal(ibn.BN.weight, converted.layer1[0].bn1.BN.weight)
    report = ibnify.export_onnx(adapted, tmp_path / "adapted.onnx", input_size=(3, 16, 16))
    plain = ibnify.export_onnx(converted, tmp_path / "plain.onnx", input_size=(3, 16, 16))
    assert len(report.fold.folded) == len(plain.fold.folded) >= 2  # the BN halves still fold
    verified = ibnify.verify_onnx(tmp_path / "adapted.onnx", adapted)
    assert verified.passed
    path = ibnify.save(adapted, tmp_path / "adapted.safetensors")
    assert ibnify.read_recipe(path).adaptations[-1]["kind"] == "entropy"
    loaded = ibnify.load(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), adapted.eval()(x[:4]))


def test_entropy_statistics_mix_the_prior_with_the_source_for_frozen_bn_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        FrozenBatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    randomize_norms(model)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.rand(4) - 0.5)
        model[1].running_var.copy_(0.5 + torch.rand(4))
    x = _images(8)
    options = AdaptOptions(batch_size=4, prior=0.5, method="entropy", lr=0.5, e_margin=1.0)
    adapted = adapt_with(model, _data(x), options)
    assert ibnify.adaptation.adaptations(adapted)[-1]["updates"] == 2
    assert not torch.equal(adapted[4].weight, model[4].weight)
    with torch.no_grad():  # two batches of 4: the mean of the batch means is the overall mean
        target = model[0](x).mean(dim=(0, 2, 3))
    expected = 0.5 * model[1].running_mean + 0.5 * target
    torch.testing.assert_close(adapted[1].running_mean, expected, rtol=0, atol=1e-6)
    assert torch.equal(adapted[1].weight, model[1].weight)  # a frozen BN's affine is a buffer
