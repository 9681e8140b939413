"""Public entry points: ``plan`` (the dry run), ``convert`` (plan, then apply) and the one
model-source resolver, :func:`resolve_model`.

A model can be given as an ``nn.Module``, as a name (``"resnet50"``, ``"tv:resnet50"``,
``"timm:seresnext50_32x4d"``, ``"ibnify:digits_resnet"``) or as an ibnify checkpoint path. A
converted model carries its :class:`~ibnify.core.recipe.Recipe` (source, constructor arguments,
every plan applied, input size, classes), so that ``ibnify.save``/``ibnify.load`` rebuild it;
converting it again appends the new plan. The plan options travel as one
:class:`~ibnify.core.plans.PlanOptions`; the keyword arguments of :func:`plan`, :func:`convert`
and :func:`convert_named` build it, or the caller (the CLI) passes ``options=`` directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .core.generic import require_batchnorm
from .core.graph import analyze
from .core.layouts import make_plan
from .core.modules import class_path, unwrap
from .core.plans import ConversionPlan, PlanOptions, stages_text
from .core.recipe import Recipe, get_recipe, set_recipe
from .core.surgery import apply_plan
from .errors import (
    ConversionError,
    InvalidOptionError,
    ModelNotFoundError,
    NoBatchNormError,
    WeightsError,
)
from .models.checkpoint import load
from .models.heads import classifier_name, num_classes_of, reset_classifier
from .models.registry import build_model, default_input_size, resolve_name
from .models.weights import describe_key_mismatch, load_state_dict_file, load_weights

__all__ = [
    "PlanOptions",
    "ResolvedModel",
    "convert",
    "convert_named",
    "is_checkpoint_spec",
    "plan",
    "resolve_model",
]


@dataclass(frozen=True)
class ResolvedModel:
    """A model given by spec: the module, its ``source:name`` and where it came from.

    ``checkpoint`` is the ibnify checkpoint it was loaded from, ``weights`` the weights file
    loaded into a model built by name, ``head`` the classifier reset to another class count.
    """

    model: nn.Module
    source: str
    checkpoint: str | None = None
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] | None = None

    @property
    def recipe(self) -> Recipe | None:
        """The model's recipe (a checkpoint's, or one a conversion made), else None."""
        return get_recipe(self.model)

    @property
    def label(self) -> str:
        """The model as reports name it: its checkpoint path, else its ``source:name``."""
        return self.checkpoint or self.source

    def rebuild_arguments(self) -> dict[str, Any]:
        """What rebuilds this model's weights by name before any conversion, in
        :func:`resolve_model`'s terms: ``spec`` (the source), ``weights`` (the weights file, or
        the checkpoint itself), ``model_kwargs`` (the constructor arguments, classes included).
        ``weights`` None: the model was built with a random init."""
        return {
            "spec": self.source,
            "weights": self.weights or self.checkpoint,
            "model_kwargs": dict(self.model_kwargs),
        }


def is_checkpoint_spec(spec: str | os.PathLike[str]) -> bool:
    """Whether a model spec names an ibnify checkpoint (an existing file or ``*.safetensors``)."""
    return Path(spec).is_file() or os.fspath(spec).endswith(".safetensors")


def resolve_model(
    spec: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    *,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> ResolvedModel:
    """Build or load the model a spec names: what every command's MODEL argument accepts.

    ``spec`` is an ibnify checkpoint path (loaded with its recipe) or a model name, built with
    ``model_kwargs`` and either the library's ``pretrained`` weights or a local ``weights``
    file: the original model's keys (``num_classes`` differing from the file's gets a fresh
    head), or IBN keys of the default IBN-a layout (the IBN-Net authors' checkpoints; the
    result is then converted). An offline pretrained failure advises a local ``weights`` file.

    Raises:
        InvalidOptionError: weights, pretrained or constructor arguments given with a checkpoint.
        ModelNotFoundError, WeightsError, CheckpointError: one line naming what is wrong.
    """
    if is_checkpoint_spec(spec):
        if weights is not None or pretrained or model_kwargs:
            raise InvalidOptionError(
                f"{os.fspath(spec)!r} is an ibnify checkpoint; weights, pretrained weights and "
                "constructor arguments apply to a model name (the checkpoint records its own)"
            )
        model = load(spec)
        recipe = get_recipe(model)
        source = recipe.source if recipe is not None and recipe.source else os.fspath(spec)
        kwargs = recipe.model_kwargs if recipe is not None else {}
        return ResolvedModel(model, source, checkpoint=os.fspath(spec), model_kwargs=kwargs)
    kwargs = dict(model_kwargs or {})
    if weights is not None and pretrained:
        raise WeightsError("give either `weights` or `pretrained`, not both")
    model, source, head = _build(os.fspath(spec), pretrained, kwargs)
    if weights is None:
        return ResolvedModel(model, source, model_kwargs=kwargs, head=head)
    state = load_state_dict_file(weights)
    if set(state) != set(model.state_dict()):  # IBN keys: convert, then load (or say why not)
        model = convert_named(os.fspath(spec), weights=weights, model_kwargs=kwargs)
        return ResolvedModel(model, source, weights=os.fspath(weights), model_kwargs=kwargs)
    what = f"weights {os.fspath(weights)!r}"
    head = _load_fitting(model, state, what, fresh_head="num_classes" in kwargs)
    return ResolvedModel(model, source, weights=os.fspath(weights), model_kwargs=kwargs, head=head)


def _build(
    spec: str, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """(model, source, head record): a torchvision model with pretrained weights and another
    ``num_classes`` is built with its own head, which then gets a fresh one of that size."""
    classes = kwargs.get("num_classes")
    if pretrained and classes is not None and resolve_name(spec).startswith("tv:"):
        rest = {k: v for k, v in kwargs.items() if k != "num_classes"}
        model, source = build_model(spec, pretrained=True, **rest)
        before = num_classes_of(model)
        if before == classes:
            return model, source, None
        name = reset_classifier(model, classes)
        return model, source, {"name": name, "from_classes": before, "num_classes": classes}
    model, source = build_model(spec, pretrained=pretrained, **kwargs)
    return model, source, None


def _load_fitting(
    model: nn.Module, state: dict[str, Any], what: str, fresh_head: bool
) -> dict[str, Any] | None:
    """Load ``state`` strictly; with ``fresh_head``, a classifier of another class count in
    ``state`` is left out and the model's freshly built head kept. Returns that head's record."""
    expected = model.state_dict()
    head = classifier_name(model) if fresh_head else None
    if head is not None and set(expected) == set(state):
        bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
        if bad and all(_is_class_axis(expected[k], state[k]) for k in bad):
            before = state.get(f"{head}.weight", state[bad[0]]).shape[0]
            load_weights(model, {**state, **{k: expected[k] for k in bad}}, what)
            return {"name": head, "from_classes": int(before), "num_classes": num_classes_of(model)}
    load_weights(model, state, what)
    return None


def _is_class_axis(expected: Any, found: Any) -> bool:
    """Whether two tensors of a classifier differ in their first (class) axis only."""
    return expected.dim() == found.dim() and tuple(expected.shape[1:]) == tuple(found.shape[1:])


def _as_model(
    model: nn.Module | str, model_kwargs: dict[str, Any] | None
) -> tuple[nn.Module, str | None, bool]:
    """(module, source when built by name, whether ibnify made it and may change it in place)."""
    if isinstance(model, str | os.PathLike):
        resolved = resolve_model(model, model_kwargs=model_kwargs)
        return resolved.model, None if resolved.checkpoint else resolved.source, True
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a model name, got {type(model).__name__}")
    return unwrap(model)[0], None, False


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
        stages=stages,  # PlanOptions parses text ("1-3") and makes a tuple
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


def _recorded_size(options: PlanOptions, recipe: Recipe | None) -> PlanOptions:
    """``options`` with the input size a converted model records, when none is asked for."""
    if options.input_size is None and recipe is not None and recipe.input_size is not None:
        return replace(options, input_size=recipe.input_size)
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
        model: a module, a model name or an ibnify checkpoint path.
        layout: ``"a"`` (IBN-a for the model's family), ``"b"`` (IBN-b, ResNet family) or an
            explicit layout name (``resnet-a``, ``resnet-b``, ``densenet-a``, ``generic-a``).
        stages: stages to convert (1 = highest resolution); default depends on the layout.
        ratio: fraction of channels given to IN; default 0.5 (0.4 for DenseNet).
        input_size: (C, H, W) of the dummy input used for shape propagation (default: the
            size a converted model records, else the model's own default).
        arch: the label the plan shows (default: the source name, else the class name).
        model_kwargs: constructor arguments when ``model`` is a name; shown in the plan's
            ``extras["model_kwargs"]`` (the recipe of the converted model records them).
        options: the four plan options as one record, instead of the keywords above.
    """
    module, source, _ = _as_model(model, model_kwargs)
    recipe = get_recipe(module)
    chosen = _recorded_size(_options(options, layout, stages, ratio, input_size), recipe)
    label = arch or source or (recipe.label if recipe is not None else None)
    require_batchnorm(module, label or type(module).__name__)
    if chosen.input_size is None:  # the model's own size (tv:inception_v3 needs its 299)
        chosen = replace(chosen, input_size=default_input_size(module))
    analysis = analyze(module, chosen.input_size, fallback=True)
    try:
        result = make_plan(module, analysis, chosen, arch=label)
    except NoBatchNormError as exc:
        if recipe is None or not recipe.plans:
            raise
        asked = f"stages {stages_text(chosen.stages)}" if chosen.stages else "its default stages"
        raise ConversionError(
            f"{recipe.label} is already converted ({recipe.conversions()}): layout "
            f"{chosen.layout} finds no "
            f"BatchNorm left to convert in {asked}; ask for stages not converted yet, or "
            "another layout"
        ) from exc
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
    Reason: nine parameters, the public keywords of ``ibnify.convert`` (``ibnify convert``'s
    options; ``options=`` takes the four plan options as one record).

    The input module is left untouched unless ``inplace=True``. Trained BN weights move into the
    new layers (see ``IBN.from_batchnorm``). A model converted before (it carries a recipe) is
    converted further and the new plan appended, so ``convert(convert(m), stages=(4,))`` saves
    and loads. For a module, ``arch="tv:resnet50"`` names the base model it was built as (its
    recipe's source, so ``ibnify.save`` can write it); a module of a class no registry knows is
    recorded by its class name, and ``ibnify.load(path, base=MyNet())`` rebuilds it. A model
    wrapped by ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel`` is converted
    unwrapped and returned unwrapped: wrap the converted model again. Other arguments are as
    for :func:`plan`.
    """
    module, source, owned = _as_model(model, model_kwargs)
    chosen = _recorded_size(
        _options(options, layout, stages, ratio, input_size), get_recipe(module)
    )
    conversion = plan(module, arch=arch or source, model_kwargs=model_kwargs, options=chosen)
    base_class = class_path(module)
    converted = apply_plan(module, conversion, inplace=inplace or owned)
    _finish(converted, source or _source_of_arch(arch), model_kwargs, chosen.input_size, None)
    recipe = get_recipe(converted)
    if recipe is not None and recipe.source is None and recipe.base_class is None:
        set_recipe(converted, replace(recipe, base_class=base_class))
    return converted


def _source_of_arch(arch: str | None) -> str | None:
    """``arch`` as a canonical source when it names a model ibnify builds, else None."""
    if not arch:
        return None
    try:
        return resolve_name(arch)
    except ModelNotFoundError:
        return None


def _finish(
    model: nn.Module,
    source: str | None,
    model_kwargs: dict[str, Any] | None,
    input_size: tuple[int, int, int] | None,
    head: dict[str, Any] | None,
) -> None:
    """Complete the recipe :func:`apply_plan` extended: what a recipe already records stays;
    a new one gets the source, constructor arguments, input size, classes and head."""
    recipe = get_recipe(model) or Recipe()
    source = recipe.source or source
    kwargs = recipe.model_kwargs or dict(model_kwargs or {})
    size = input_size or recipe.input_size or _default_size(model, source, kwargs)
    set_recipe(
        model,
        replace(
            recipe,
            source=source,
            model_kwargs=kwargs,
            input_size=size,
            num_classes=num_classes_of(model),
            head=head or recipe.head,
        ),
    )


def _default_size(
    model: nn.Module, source: str | None, kwargs: dict[str, Any]
) -> tuple[int, int, int]:
    """The input size a model takes by default (``tv:inception_v3``: 299)."""
    if source is not None:
        try:
            return default_input_size(source, kwargs)
        except ModelNotFoundError:
            pass
    return default_input_size(model)


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
    Reason: nine parameters, :func:`convert`'s plan keywords and the weights source.

    ``name`` may also be an ibnify checkpoint, which is converted further (its recipe then
    holds both plans). ``weights`` may hold the original architecture's keys (loaded before
    conversion) or the converted model's IBN keys, such as the IBN-Net authors' checkpoints
    (loaded after). With ``model_kwargs={"num_classes": N}`` and weights of another class count,
    the body loads and the classifier gets a fresh head of N (recorded in the recipe's
    ``head``).
    """
    chosen = _options(options, layout, stages, ratio, input_size)
    if is_checkpoint_spec(name):
        loaded = resolve_model(name, weights, pretrained=pretrained, model_kwargs=model_kwargs)
        return convert(loaded.model, inplace=True, options=chosen)
    if weights is not None and pretrained:
        raise WeightsError("give either `weights` or `pretrained`, not both")
    state = load_state_dict_file(weights) if weights is not None else None
    kwargs = dict(model_kwargs or {})
    base, source, head = _build(name, pretrained, kwargs)
    conversion = plan(base, arch=source, model_kwargs=kwargs, options=chosen)
    if state is None:
        converted = apply_plan(base, conversion, inplace=True)
    else:
        what = f"weights {os.fspath(weights)!r}"
        converted, head = _convert_with_weights(base, conversion, state, what, kwargs)
    _finish(converted, source, kwargs, chosen.input_size, head)
    return converted


def _convert_with_weights(
    base: nn.Module,
    conversion: ConversionPlan,
    state: dict[str, Any],
    what: str,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Apply ``conversion`` to ``base`` in place and load ``state`` where its keys fit: before
    the conversion (the original architecture's keys) or after it (the converted IBN keys).
    Returns the converted model and a fresh head's record (``num_classes`` in ``kwargs``)."""
    fresh_head = "num_classes" in kwargs
    base_keys = base.state_dict()  # before the conversion changes the names
    if set(state) == set(base_keys):
        head = _load_fitting(base, state, what, fresh_head=fresh_head)
        return apply_plan(base, conversion, inplace=True), head
    converted = apply_plan(base, conversion, inplace=True)
    converted_keys = converted.state_dict()
    if set(state) != set(converted_keys):
        more = _overlap(state, converted_keys) > _overlap(state, base_keys)
        raise WeightsError(
            f"{what} do not fit {conversion.arch}: "
            + describe_key_mismatch(converted_keys if more else base_keys, state)
        )
    return converted, _load_fitting(converted, state, what, fresh_head=fresh_head)


def _overlap(state: dict[str, Any], expected: dict[str, Any]) -> int:
    return len(set(state) & set(expected))
