"""core/modules.py: the one ``device_of`` and the one mode-restoring context manager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibnify.core.modules import device_of, eval_mode, modes_restored


def _model() -> nn.Sequential:
    """A training model whose BN is deliberately kept in eval mode with a frozen weight."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    model[1].eval()
    model[1].weight.requires_grad_(False)
    return model


def test_modes_restored_gives_each_module_its_own_flag_back_also_on_error() -> None:
    model, teacher = _model(), nn.Linear(2, 2).eval()
    with pytest.raises(RuntimeError, match="boom"), modes_restored(model, None, teacher):
        model.train()
        teacher.train()
        model[1].weight.requires_grad_(True)
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False]
    assert teacher.training is False
    assert model[1].weight.requires_grad is True  # flags only with requires_grad=True
    model[1].weight.requires_grad_(False)
    with modes_restored(model, requires_grad=True):
        model.requires_grad_(True)
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]


def test_eval_mode_puts_every_module_in_eval_and_restores_each() -> None:
    model = _model()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]


def test_device_of_reads_parameters_then_buffers_then_the_default() -> None:
    assert device_of(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    buffers_only = nn.Module()
    buffers_only.register_buffer("stat", torch.zeros(2, device="meta"))
    assert device_of(buffers_only) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")
    assert device_of(nn.ReLU(), torch.device("meta")) == torch.device("meta")
