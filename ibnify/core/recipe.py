"""Recipe: the one provenance record of a converted model (what rebuilds it, what it expects).

A converted model carries its :class:`Recipe` as an attribute; ``ibnify.save`` writes it as JSON,
``ibnify.load`` reads it back, the ONNX export stores it in the metadata and ``verify`` checks a
file against it. The recipe holds the base model's source (``tv:resnet50``; None for a model
converted from an instance), its constructor arguments, **every plan applied, in order** (so a
model converted twice, IBN-a then stage 4 or IBN-b, replays both), the input size, the class
count, a reset classifier head and the adaptations run on it (AdaBN).

``from_dict`` is the one gate for recipes read from files: it reads format 2 and the single-plan
format 1 that ibnify 0.1.0 wrote, and checks constructor arguments with the caller's allowlist
(``core`` knows no model library; :mod:`ibnify.models.checkpoint` passes its own check).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..errors import CheckpointError, first_line
from .plans import ConversionPlan, stages_text

__all__ = [
    "FORMAT",
    "FORMATS",
    "LEGACY_FORMAT",
    "RECIPE_ATTRIBUTE",
    "Recipe",
    "get_recipe",
    "set_recipe",
    "with_adaptation",
]

FORMAT = "ibnify.checkpoint/2"
LEGACY_FORMAT = "ibnify.checkpoint/1"  # one ``plan``; written by ibnify 0.1.0
FORMATS = (FORMAT, LEGACY_FORMAT)  # recipe formats this version reads
RECIPE_ATTRIBUTE = "ibnify_recipe"
_MAX_PLANS = 16
_MAX_ADAPTATIONS = 64

KwargsCheck = Callable[[Any, str], dict[str, Any]]


@dataclass(frozen=True)
class Recipe:
    """What rebuilds a converted model, and what it was made for.

    ``source`` names the base model (``tv:resnet50``; None when converted from an instance of a
    class no registry knows), ``base_class`` that instance's class (``mypkg.nets.MyNet``: a name
    for messages, never imported; loading such a file needs the base model given in Python),
    ``model_kwargs`` its constructor arguments, ``plans`` every conversion applied in order
    (none for a model saved unconverted), ``input_size`` the (C, H, W) it was converted for,
    ``num_classes`` its classifier's outputs, ``head`` the classifier reset at conversion
    (``{"name", "from_classes", "num_classes"}``), ``adaptations`` records such as
    ``{"kind": "adabn", "images": 200}`` appended by ``ibnify.adapt``.
    """

    source: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    base_class: str | None = None
    plans: tuple[ConversionPlan, ...] = ()
    input_size: tuple[int, int, int] | None = None
    num_classes: int | None = None
    head: dict[str, Any] | None = None
    adaptations: tuple[dict[str, Any], ...] = ()
    format: str = FORMAT
    ibnify_version: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "plans", tuple(self.plans))
        object.__setattr__(self, "adaptations", tuple(dict(a) for a in self.adaptations))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    @property
    def plan(self) -> ConversionPlan | None:
        """The last plan applied (what ``get_plan`` returns), or None."""
        return self.plans[-1] if self.plans else None

    @property
    def label(self) -> str:
        """How messages name the model: its source, else the first plan's label."""
        return self.source or (self.plans[0].arch if self.plans else "the model")

    @property
    def base_class_name(self) -> str:
        """The short class name of the base instance (``MyNet``), for messages and checks."""
        return (self.base_class or self.label).rsplit(".", 1)[-1]

    def with_plan(self, plan: ConversionPlan) -> Recipe:
        """This recipe with ``plan`` appended (``model_kwargs`` kept out of the plan)."""
        extras = {k: v for k, v in plan.extras.items() if k != "model_kwargs"}
        return replace(self, plans=(*self.plans, replace(plan, extras=extras)))

    def with_adaptation(self, record: Mapping[str, Any]) -> Recipe:
        """This recipe with one adaptation record (plain JSON values) appended."""
        return replace(self, adaptations=(*self.adaptations, _plain_record(record, "adaptation")))

    @property
    def layout(self) -> str:
        """The layouts of every plan in order, joined by ``+`` (``resnet-a+resnet-b``)."""
        return "+".join(dict.fromkeys(p.layout for p in self.plans))

    @property
    def stages(self) -> list[int]:
        """The union of every plan's stages, sorted."""
        return sorted({s for p in self.plans for s in p.stages})

    @property
    def ratio(self) -> float | None:
        """The last plan's IN ratio (None without a plan)."""
        return self.plans[-1].ratio if self.plans else None

    @property
    def sites(self) -> int:
        """How many norm layers every plan converted together."""
        return sum(len(p.sites) for p in self.plans)

    def summary(self) -> dict[str, Any]:
        """``layout``, ``stages``, ``ratio`` and ``sites`` over every plan, for readers that
        parse no plan (the ONNX metadata, reports): one plan gives its own values; stacked
        plans the layouts joined by ``+``, the union of their stages and the last ratio."""
        return {
            "layout": self.layout,
            "stages": self.stages,
            "ratio": self.ratio,
            "sites": self.sites,
        }

    def conversions(self) -> str:
        """The plans in words: ``resnet-a stages 1,2,3 then resnet-a stages 4``."""
        parts = [f"{p.layout} stages {stages_text(p.stages) or '-'}" for p in self.plans]
        return " then ".join(parts) or "no conversion"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (format 2) that :meth:`from_dict` restores exactly."""
        record = {
            "format": FORMAT,
            "ibnify_version": self.ibnify_version,
            "source": self.source,
            "model_kwargs": dict(self.model_kwargs),
            "plans": [p.to_dict() for p in self.plans],
            "input_size": None if self.input_size is None else list(self.input_size),
            "num_classes": self.num_classes,
            "head": None if self.head is None else dict(self.head),
            "adaptations": [dict(a) for a in self.adaptations],
        }
        if self.base_class is not None:  # only files of models converted from an instance
            record["base_class"] = self.base_class
        return record

    @classmethod
    def from_dict(
        cls, data: Any, where: str = "the checkpoint", check_kwargs: KwargsCheck | None = None
    ) -> Recipe:
        """Check a recipe read from a file and return it; nothing is opened or built.

        ``check_kwargs(kwargs, where)`` vets the constructor arguments (the allowlist of
        :func:`ibnify.models.registry.check_model_kwargs`); without it only their form is checked.

        Raises:
            CheckpointError: an unknown format (naming the ibnify version that wrote it), a
                missing or malformed field, or a refused constructor argument (named).
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} has a damaged ibnify recipe (not a JSON object)")
        version = data.get("ibnify_version")
        version = str(version)[:40] if isinstance(version, str | int | float) else "unknown"
        fmt = data.get("format")
        if fmt is None:
            raise CheckpointError(f"{where} has a damaged ibnify recipe (no format)")
        if fmt not in FORMATS:
            shown = repr(fmt)[:60] if isinstance(fmt, str) else type(fmt).__name__
            raise CheckpointError(
                f"{where} has recipe format {shown}, written by ibnify {version}; this ibnify "
                f"reads {', '.join(FORMATS)} only (upgrade ibnify to load it)"
            )
        source, base_class = _read_source(data, where)
        damaged = f"{where} has a damaged ibnify recipe"
        raw_plans = [data.get("plan")] if fmt == LEGACY_FORMAT else data.get("plans")
        if not isinstance(raw_plans, list) or len(raw_plans) > _MAX_PLANS:  # [] = unconverted
            raise CheckpointError(f"{damaged} (no list of at most {_MAX_PLANS} plans)")
        check = check_kwargs or _check_form
        kwargs = _recorded_kwargs(data, raw_plans, where, check)
        plans = tuple(_read_plan(p, damaged) for p in raw_plans)
        try:
            return cls(
                source=source,
                model_kwargs=kwargs,
                base_class=base_class,
                plans=plans,
                input_size=_read_size(data.get("input_size")),
                num_classes=_read_count(data.get("num_classes")),
                head=None if data.get("head") is None else _plain_record(data["head"], "head"),
                adaptations=_read_adaptations(data.get("adaptations")),
                format=fmt,
                ibnify_version=version,
            )
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{damaged} ({first_line(exc)[:160]})") from exc


_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_<>][A-Za-z0-9_<>]*)*$")


def _read_source(data: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """The recorded ``source`` and ``base_class``: a buildable name, or (format 2) no name and
    the class of the instance it was converted from."""
    source, base_class = data.get("source"), data.get("base_class")
    if base_class is not None and (
        not isinstance(base_class, str)
        or not 0 < len(base_class) <= 200
        or not _CLASS_NAME.match(base_class)
    ):
        raise CheckpointError(f"{where} has a damaged ibnify recipe (base_class is not a name)")
    if source is None and base_class is not None and data.get("format") == FORMAT:
        return None, base_class
    if not isinstance(source, str) or not 0 < len(source) <= 200:
        raise CheckpointError(f"{where} has a damaged ibnify recipe (no source model name)")
    return source, base_class


def _check_form(kwargs: Any, where: str) -> dict[str, Any]:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"{where}: model_kwargs is not a mapping of names to values")
    return dict(kwargs)


def _recorded_kwargs(
    data: dict[str, Any], plans: list[Any], where: str, check: KwargsCheck
) -> dict[str, Any]:
    """The constructor arguments: at the top level, or (files before 0.1.0) in a plan's extras.

    Every copy is checked; two copies that differ are refused.
    """
    copies = []
    for plan in plans:
        if not isinstance(plan, dict):
            continue
        extras = plan.get("extras") if isinstance(plan.get("extras"), dict) else {}
        for found in (plan.get("model_kwargs"), extras.get("model_kwargs")):
            if found is not None:
                copies.append(check(found, where))
    top = data.get("model_kwargs")
    if top is None:
        top = copies[0] if copies else {}
    kwargs = check(top, where)
    if any(copy != kwargs for copy in copies):
        raise CheckpointError(f"{where} has a damaged ibnify recipe (two different model_kwargs)")
    return kwargs


def _read_plan(data: Any, damaged: str) -> ConversionPlan:
    if not isinstance(data, dict):
        raise CheckpointError(f"{damaged} (a plan is not a JSON object)")
    plan = dict(data)
    plan.pop("model_kwargs", None)
    if isinstance(plan.get("extras"), dict):
        plan["extras"] = {k: v for k, v in plan["extras"].items() if k != "model_kwargs"}
    try:
        return ConversionPlan.from_dict(plan)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{damaged} ({first_line(exc)[:160]})") from exc


def _read_size(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(1 <= v <= 16384 for v in value)
    ):
        raise ValueError("input_size is not three positive integers")
    return value[0], value[1], value[2]


def _read_count(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise ValueError("num_classes is not a class count")
    return value


def _read_adaptations(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > _MAX_ADAPTATIONS:
        raise ValueError("adaptations is not a short list of records")
    return tuple(_plain_record(item, "adaptation") for item in value)


def _plain_record(record: Any, what: str) -> dict[str, Any]:
    """``record`` as a dict of short names to JSON scalars (str, int, float, bool, None)."""
    if not isinstance(record, Mapping) or len(record) > 32:
        raise ValueError(f"{what} is not a small record of names to values")
    result: dict[str, Any] = {}
    for key, value in record.items():
        if not isinstance(key, str) or not 0 < len(key) <= 40:
            raise ValueError(f"{what} has a key that is not a short name")
        if isinstance(value, str):
            value = value[:200]
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what} {key!r} is not a finite number")
        elif value is not None and not isinstance(value, bool | int | float):
            raise ValueError(f"{what} {key!r} is a {type(value).__name__}, not a plain value")
        result[key] = value
    return result


def get_recipe(model: nn.Module) -> Recipe | None:
    """The recipe a model carries, or None for a model ibnify did not convert or adapt."""
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    return recipe if isinstance(recipe, Recipe) else None


def set_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Attach ``recipe`` to ``model`` (replacing any), in place: for a model ibnify just made."""
    object.__setattr__(model, RECIPE_ATTRIBUTE, recipe)


def with_adaptation(model: nn.Module, record: Mapping[str, Any]) -> None:
    """Append an adaptation record to ``model``'s recipe, in place (call it on your own copy).

    A model without a recipe gets one with no plans (``ibnify.save`` writes it unconverted).

    Raises:
        ValueError: ``record`` is not a small mapping of names to plain JSON values.
    """
    recipe = get_recipe(model) or Recipe()
    set_recipe(model, recipe.with_adaptation(record))
