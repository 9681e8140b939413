"""Public entry points: ``plan`` (the dry run) and ``convert`` (plan, then apply).

A model can be given as an ``nn.Module`` or as a name (``"resnet50"``, ``"tv:resnet50"``,
``"timm:seresnext50_32x4d"``); a model built from a name records its source in the plan so that
``ibnify.save``/``ibnify.load`` can rebuild it. The plan options travel as one
:class:`~ibnify.core.plans.PlanOptions`; the keyword arguments of :func:`plan`, :func:`convert`
and :func:`convert_named` build it, or the caller (the CLI) passes ``options=`` directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from .core.generic import require_batchnorm
from .core.graph import analyze
from .core.layouts import make_plan
from .core.plans import ConversionPlan, PlanOptions
from .core.surgery import apply_plan
from .errors import InvalidOptionError, WeightsError
from .models.registry import build_model
from .models.weights import describe_key_mismatch, load_state_dict_file, load_weights

__all__ = ["PlanOptions", "convert", "convert_named", "plan"]


def _as_model(
    model: nn.Module | str, model_kwargs: dict[str, Any] | None
) -> tuple[nn.Module, str | None]:
    if isinstance(model, str):
        built, source = build_model(model, **(model_kwargs or {}))
        return built, source
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a model name, got {type(model).__name__}")
    return model, None


def _options(
    options: PlanOptions | None,
    layout: str,
    stages: Sequence[int] | None,
    ratio: float | None,
    input_size: tuple[int, int, int] | None,
) -> PlanOptions:
    """``options``, or the options the loose keywords describe (not both)."""
    loose = PlanOptions(
        layout=layout,
        stages=None if stages is None else tuple(stages),
        ratio=ratio,
        input_size=input_size,
    )
    if options is None:
        return loose
    if loose != PlanOptions():
        raise InvalidOptionError(
            "give either options= or layout/stages/ratio/input_size keywords, not both"
        )
    return options


def plan(
    model: nn.Module | str,
    layout: str = "a",
    stages: Sequence[int] | None = None,
    ratio: float | None = None,
    input_size: tuple[int, int, int] | None = None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
) -> ConversionPlan:
    """Describe what :func:`convert` would change, without touching the model.

    Args:
        model: a module or a model name.
        layout: ``"a"`` (IBN-a for the model's family), ``"b"`` (IBN-b, ResNet family) or an
            explicit layout name (``resnet-a``, ``resnet-b``, ``densenet-a``, ``generic-a``).
        stages: stages to convert (1 = highest resolution); default depends on the layout.
        ratio: fraction of channels given to IN; default 0.5 (0.4 for DenseNet).
        input_size: (C, H, W) of the dummy input used for shape propagation.
        arch: name recorded in the plan; ``source:name`` when the model was built by name.
        model_kwargs: constructor arguments when ``model`` is a name; recorded in the plan's
            ``extras["model_kwargs"]``.
        options: the four plan options as one record, instead of the keywords above.
    """
    chosen = _options(options, layout, stages, ratio, input_size)
    module, source = _as_model(model, model_kwargs)
    require_batchnorm(module, arch or source or type(module).__name__)
    analysis = analyze(module, chosen.input_size, fallback=True)
    result = make_plan(module, analysis, chosen, arch=arch or source)
    if model_kwargs:  # the plan is frozen: record the constructor arguments in a new one
        result = replace(result, extras={**result.extras, "model_kwargs": dict(model_kwargs)})
    return result


def convert(
    model: nn.Module | str,
    layout: str = "a",
    stages: Sequence[int] | None = None,
    ratio: float | None = None,
    inplace: bool = False,
    input_size: tuple[int, int, int] | None = None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
) -> nn.Module:
    """Convert a BatchNorm CNN into its IBN-Net form and return it.

    The input module is left untouched unless ``inplace=True``. Trained BN weights move into the
    new layers (see ``IBN.from_batchnorm``). Arguments are as for :func:`plan`.
    """
    chosen = _options(options, layout, stages, ratio, input_size)
    module, source = _as_model(model, model_kwargs)
    conversion = plan(module, arch=arch or source, model_kwargs=model_kwargs, options=chosen)
    return apply_plan(module, conversion, inplace=inplace or source is not None)


def convert_named(
    name: str,
    layout: str = "a",
    stages: Sequence[int] | None = None,
    ratio: float | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    input_size: tuple[int, int, int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
) -> nn.Module:
    """Build a model by name, load weights, convert it: what ``ibnify convert`` does.

    ``weights`` may hold the original architecture's keys (loaded before conversion) or the
    converted model's IBN keys, such as the IBN-Net authors' checkpoints (loaded after).
    """
    chosen = _options(options, layout, stages, ratio, input_size)
    if weights is not None and pretrained:
        raise WeightsError("give either --weights or --pretrained, not both")
    state = load_state_dict_file(weights) if weights is not None else None
    base, source = build_model(name, pretrained=pretrained, **(model_kwargs or {}))
    conversion = plan(base, arch=source, model_kwargs=model_kwargs, options=chosen)
    if state is None:
        return apply_plan(base, conversion, inplace=True)
    base_keys = base.state_dict()
    if set(state) == set(base_keys):
        load_weights(base, state, what=f"weights {os.fspath(weights)!r}")
        return apply_plan(base, conversion, inplace=True)
    converted = apply_plan(base, conversion, inplace=True)
    converted_keys = converted.state_dict()
    if set(state) == set(converted_keys):
        load_weights(converted, state, what=f"weights {os.fspath(weights)!r}")
        return converted
    closer = (
        converted_keys
        if _overlap(state, converted_keys) > _overlap(state, base_keys)
        else base_keys
    )
    raise WeightsError(
        f"weights {os.fspath(weights)!r} do not fit {source}: "
        + describe_key_mismatch(closer, state)
    )


def _overlap(state: dict[str, Any], expected: dict[str, Any]) -> int:
    return len(set(state) & set(expected))
