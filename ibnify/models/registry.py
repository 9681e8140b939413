"""Model sources: resolve a name to a torchvision or timm model, and load local weights safely.

``resnet50`` resolves torchvision first, then timm; ``tv:NAME`` and ``timm:NAME`` force one.
Weights files are read with ``torch.load(weights_only=True)`` or safetensors only, so loading a
file never runs code from it.

Constructor arguments that come from a file (a checkpoint's recipe) pass
:func:`check_model_kwargs` first: only arguments that shape the network, as plain JSON values,
reach ``timm.create_model``/``torchvision.models.get_model``. Arguments that load weights or
reach the network (``pretrained``, ``checkpoint_path``, ``weights``, ``pretrained_cfg_overlay``,
...) are refused, so a stranger's checkpoint cannot make ibnify open another file or go online.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import socket
import urllib.error
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
import torchvision
from huggingface_hub import constants
from torch import nn

from ..core.tracing import default_input_size as _traced_input_size
from ..errors import CheckpointError, ModelNotFoundError, WeightsError, first_line
from .small import MODELS

__all__ = [
    "MODEL_KWARGS",
    "SOURCES",
    "WEIGHTS_ADVICE",
    "build_model",
    "build_recorded_model",
    "check_model_kwargs",
    "default_input_size",
    "resolve_name",
]

SOURCES = ("tv", "timm", "ibnify")
# What a pretrained-weights failure suggests: a local ``weights`` file (the CLI names its flag).
WEIGHTS_ADVICE = "pass a local file with `weights=FILE` instead"


# torchvision's image model families that ibnify builds by name; video, optical flow and
# quantized models take other inputs or hold no float BatchNorm to convert.
_TV_IMAGE_MODULES = (
    torchvision.models,
    torchvision.models.segmentation,
    torchvision.models.detection,
)


@cache
def _torchvision_names() -> tuple[str, ...]:
    """Every classification, segmentation and detection model ``get_model`` builds."""
    names = (n for m in _TV_IMAGE_MODULES for n in torchvision.models.list_models(module=m))
    return tuple(dict.fromkeys(names))


@cache
def _torchvision_wrapped_names() -> frozenset[str]:
    """Segmentation and detection models: a backbone whose own weights would download."""
    return frozenset(
        name
        for module in _TV_IMAGE_MODULES[1:]
        for name in torchvision.models.list_models(module=module)
    )


def _local_names() -> tuple[str, ...]:
    return tuple(MODELS)


@cache
def _timm_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def resolve_name(name: str) -> str:
    """Return the canonical ``source:name`` for a user's model name.

    Raises:
        ModelNotFoundError: neither source knows the name; the message suggests close names.
    """
    text = name.strip()
    source, sep, bare = text.partition(":")
    if sep:
        if source not in SOURCES:
            raise ModelNotFoundError(
                f"unknown model source {source!r} in {name!r}; valid sources: "
                + ", ".join(f"{s}:" for s in SOURCES)
            )
        candidates = {"tv": _torchvision_names, "timm": _timm_names, "ibnify": _local_names}[
            source
        ]()
        if bare in candidates:
            return f"{source}:{bare}"
        raise ModelNotFoundError(_unknown_message(name, bare, candidates))
    if text in _torchvision_names():
        return f"tv:{text}"
    if text in _timm_names():
        return f"timm:{text}"
    if text in _local_names():
        return f"ibnify:{text}"
    everywhere = tuple(dict.fromkeys(_torchvision_names() + _timm_names()))  # once per name
    raise ModelNotFoundError(_unknown_message(name, text, everywhere))


def _unknown_message(original: str, bare: str, candidates: tuple[str, ...]) -> str:
    close = _close_names(bare, candidates)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    return f"unknown model {original!r}{hint}"


def _normalised(name: str) -> str:
    """Lowercase letters and digits only: ``mobilenetv3`` and ``mobilenet_v3_large`` align."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _close_names(bare: str, candidates: tuple[str, ...], n: int = 3) -> list[str]:
    """Names that differ from ``bare`` in spelling only, then names it starts, then close ones.

    Matching runs on :func:`_normalised` names, so separators do not count; among the names
    ``bare`` starts, those earlier in ``candidates`` torchvision's first, shorter first.
    """
    key = _normalised(bare)
    if not key:
        return []
    by_key: dict[str, list[str]] = {}
    for name in candidates:
        by_key.setdefault(_normalised(name), []).append(name)
    order = {name: index for index, name in enumerate(candidates)}
    torchvision_first = set(_torchvision_names())
    same = by_key.get(key, [])
    started = sorted(
        (name for k, names in by_key.items() if k != key and k.startswith(key) for name in names),
        key=lambda name: (name not in torchvision_first, len(name), order[name]),
    )
    similar = [
        name
        for k in difflib.get_close_matches(key, list(by_key), n=n, cutoff=0.6)
        for name in by_key[k]
    ]
    return list(dict.fromkeys([*same, *started, *similar]))[:n]


def build_model(name: str, pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, str]:
    """Build a model by name; return ``(model, "source:name")``.

    ``kwargs`` go to the constructor (for example ``num_classes``). With ``pretrained`` the
    library's own download is used; offline that fails with a WeightsError ending in
    :data:`WEIGHTS_ADVICE`.
    """
    source_id = resolve_name(name)
    source, _, bare = source_id.partition(":")
    if pretrained:
        _check_weights_reachable(source, bare)
    try:
        if source == "tv":
            weights = "DEFAULT" if pretrained else None
            if bare in _torchvision_wrapped_names():  # the model's weights, or none at all
                kwargs.setdefault("weights_backbone", None)
            model = torchvision.models.get_model(bare, weights=weights, **kwargs)
        elif source == "ibnify":
            if pretrained:
                raise WeightsError(f"{source_id} has no pretrained weights; {WEIGHTS_ADVICE}")
            model = MODELS[bare](**kwargs)
        else:
            model = timm.create_model(bare, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained and _looks_like_download_failure(exc):
            raise WeightsError(
                f"could not download pretrained weights for {source_id} (no network?); "
                f"{WEIGHTS_ADVICE}"
            ) from exc
        raise
    return model, source_id


_FALLBACK_INPUT_SIZE = (3, 224, 224)


def default_input_size(
    name_or_model: str | nn.Module, model_kwargs: dict[str, Any] | None = None
) -> tuple[int, int, int]:
    """(C, H, W) the model takes by default, so ``tv:inception_v3`` gets 299 without being told.

    A name reads torchvision's weights meta (the classification crop size) or timm's
    ``pretrained_cfg["input_size"]`` without building anything (``ibnify:`` models are tiny and
    are built); a module reads its own ``pretrained_cfg`` (timm, ``ibnify:``) or, for a
    torchvision classifier, the crop size every builder of its class shares. Anything else
    (detection, segmentation, an unknown class) gets 3×224×224, which their analysis needs only.

    Raises:
        ModelNotFoundError: a name that resolves to no model.
    """
    if isinstance(name_or_model, nn.Module):
        traced = _traced_input_size(name_or_model)
        if traced != _FALLBACK_INPUT_SIZE:  # the model's own pretrained_cfg, or 1-channel stem
            return traced
        size = _torchvision_class_sizes().get(type(name_or_model))
        return (traced[0], size, size) if size else traced
    kwargs = model_kwargs or {}
    source, _, bare = resolve_name(name_or_model).partition(":")
    if source == "tv":
        size = _torchvision_crop_size(bare)
        return (3, size, size) if size else _FALLBACK_INPUT_SIZE
    if source == "ibnify":
        return _traced_input_size(MODELS[bare](**kwargs))
    cfg = timm.models.get_pretrained_cfg(bare)
    size = tuple(getattr(cfg, "input_size", None) or _FALLBACK_INPUT_SIZE)
    return (int(kwargs.get("in_chans", size[0])), int(size[1]), int(size[2]))


def _torchvision_crop_size(bare: str) -> int | None:
    """The smallest crop size among a torchvision model's weights: the size the architecture
    built without weights takes (``vit_h_14``'s 518 belongs to weights that resize the model)."""
    try:
        weights = list(torchvision.models.get_model_weights(bare))
    except (ValueError, KeyError):
        return None
    sizes = [
        int(w.transforms.keywords["crop_size"])
        for w in weights
        if "crop_size" in (getattr(w.transforms, "keywords", None) or {})
    ]
    return min(sizes) if sizes else None


@cache
def _torchvision_class_sizes() -> dict[type, int]:
    """Model class → crop size, for torchvision classes whose every builder agrees on one."""
    sizes: dict[type, set[int]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        cls = inspect.signature(torchvision.models.get_model_builder(name)).return_annotation
        size = _torchvision_crop_size(name)
        if isinstance(cls, type) and size:
            sizes.setdefault(cls, set()).add(size)
    return {cls: next(iter(found)) for cls, found in sizes.items() if len(found) == 1}


def _weights_location(source: str, bare: str) -> tuple[str | None, bool]:
    """(URL the library would download pretrained weights from, whether they are cached)."""
    if source == "tv":
        try:
            url = torchvision.models.get_model_weights(bare).DEFAULT.url
        except (ValueError, AttributeError, KeyError):
            return None, False
        cached = Path(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1]).is_file()
        return url, cached

    cfg = timm.models.get_pretrained_cfg(bare)
    if cfg is None:
        return None, False
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += ["model.safetensors", "pytorch_model.bin"]
        cached = any(
            isinstance(huggingface_hub.try_to_load_from_cache(repo, n), str) for n in names
        )
        return constants.ENDPOINT, cached
    return cfg.url, False


def _check_weights_reachable(source: str, bare: str) -> None:
    """Fail at once, with one line, when pretrained weights are neither cached nor reachable.

    Without this the libraries print download progress and retry for a minute before failing.
    """
    url, cached = _weights_location(source, bare)
    if cached:
        return
    if url is None:
        raise WeightsError(
            f"{source}:{bare} has no pretrained weights to download; {WEIGHTS_ADVICE}"
        )
    host = urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise WeightsError(
            f"could not download pretrained weights for {source}:{bare} ({host} is not "
            f"reachable); {WEIGHTS_ADVICE}"
        ) from None


def _looks_like_download_failure(exc: BaseException) -> bool:
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, urllib.error.URLError | ConnectionError | TimeoutError | OSError):
            return True
        text = str(chain).lower()
        if any(word in text for word in ("download", "connection", "resolve", "network", "hub")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


@dataclass(frozen=True)
class _Arg:
    """What one allowed constructor argument may hold: a kind and an inclusive range.

    Kinds: ``int``, ``float`` (an int is accepted), ``bool``, ``name`` (letters, digits and
    ``_``, at most ``high`` characters), ``ints``/``bools`` (a flat list of at most 8 of them).
    """

    kind: str
    low: float = 0
    high: float = 0


# Constructor arguments a recipe may carry: they shape the network and nothing else.
MODEL_KWARGS: dict[str, _Arg] = {
    "num_classes": _Arg("int", 0, 1_000_000),
    "in_chans": _Arg("int", 1, 64),  # timm, ibnify:
    "drop_rate": _Arg("float", 0, 1),
    "drop_path_rate": _Arg("float", 0, 1),  # timm
    "drop_block_rate": _Arg("float", 0, 1),  # timm ResNet
    "global_pool": _Arg("name", 0, 16),  # timm: avg, max, avgmax, catavgmax, ...
    "output_stride": _Arg("int", 8, 32),  # timm: 8, 16 or 32
    "stem_type": _Arg("name", 0, 16),  # timm ResNet: "", deep, deep_tiered
    "stem_width": _Arg("int", 1, 1024),  # timm ResNet
    "base_width": _Arg("int", 1, 1024),  # timm ResNet/ResNeXt
    "cardinality": _Arg("int", 1, 1024),  # timm ResNeXt
    "layers": _Arg("ints", 1, 64),  # timm ResNet: blocks per stage
    "width_per_group": _Arg("int", 1, 1024),  # torchvision ResNet/ResNeXt
    "groups": _Arg("int", 1, 1024),  # torchvision ResNeXt
    "replace_stride_with_dilation": _Arg("bools"),  # torchvision ResNet (dilated backbones)
    "zero_init_residual": _Arg("bool"),  # torchvision ResNet
    "bn_size": _Arg("int", 1, 64),  # torchvision DenseNet
    "memory_efficient": _Arg("bool"),  # torchvision DenseNet
    "width_mult": _Arg("float", 0.01, 10),  # torchvision MobileNetV2
    "features_only": _Arg("bool"),  # timm: feature maps instead of logits
    "out_indices": _Arg("ints", 0, 8),  # timm features_only: which feature maps
    "width": _Arg("int", 1, 1024),  # ibnify:digits_resnet, channels of stage 1
    "blocks": _Arg("ints", 1, 64),  # ibnify:digits_resnet, blocks per stage
    "image_size": _Arg("int", 1, 4096),  # ibnify:digits_resnet
}

# Names that make timm/torchvision load weights, read a file or reach the network.
_REACHES_OUT = re.compile(
    r"^(pretrained.*|checkpoint.*|weights.*|.*_?file.*|.*url.*|hf_hub.*|.*_dir|.*_path|progress)$"
)
_NAME = re.compile(r"^[A-Za-z0-9_]*$")


def check_model_kwargs(kwargs: Any, where: str = "the recipe") -> dict[str, Any]:
    """Return ``kwargs`` if every key is in :data:`MODEL_KWARGS` and every value fits its rule.

    For constructor arguments read from a file. Nothing is opened or built here.

    Raises:
        CheckpointError: one line naming the first key that is refused and why.
    """
    if not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{where}: model_kwargs is a {type(kwargs).__name__}, not a mapping of names to values"
        )
    for key, value in kwargs.items():
        if not isinstance(key, str) or key not in MODEL_KWARGS:
            if isinstance(key, str) and _REACHES_OUT.match(key):
                why = "it would make the model library load weights, read a file or go online"
            else:
                why = "it is not a network-shaping argument ibnify rebuilds models with"
            raise CheckpointError(
                f"{where}: refusing model_kwargs key {str(key)[:60]!r}: {why} (see SECURITY.md)"
            )
        problem = _value_problem(MODEL_KWARGS[key], value)
        if problem:
            raise CheckpointError(f"{where}: refusing model_kwargs key {key!r}: {problem}")
    return dict(kwargs)


def _value_problem(rule: _Arg, value: Any) -> str:
    """Why ``value`` breaks ``rule`` ('' when it fits)."""
    shown = repr(value) if isinstance(value, int | float | bool | str) else type(value).__name__
    shown = shown[:40]
    if rule.kind in ("ints", "bools"):
        if not isinstance(value, list) or len(value) > 8:
            return f"{shown} is not a list of at most 8 {rule.kind[:-1]}s"
        for item in value:
            problem = _value_problem(_Arg(rule.kind[:-1], rule.low, rule.high), item)
            if problem:
                return problem
        return ""
    if rule.kind == "bool":
        return "" if isinstance(value, bool) else f"{shown} is not true or false"
    if rule.kind == "name":
        if isinstance(value, str) and len(value) <= rule.high and _NAME.match(value):
            return ""
        return f"{shown} is not a short name (letters, digits, _)"
    kinds = (int,) if rule.kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        return f"{shown} is not {'an integer' if rule.kind == 'int' else 'a number'}"
    if not rule.low <= value <= rule.high:
        return f"{shown} is outside {rule.low:g}..{rule.high:g}"
    return ""


def build_recorded_model(
    source: str, model_kwargs: Any, where: str = "the recipe"
) -> tuple[nn.Module, str]:
    """Build a base model from a name and constructor arguments read from a file.

    The arguments pass :func:`check_model_kwargs` first and the model is built without
    pretrained weights, so nothing but the model library's own code runs: no file is opened
    and no connection is made.

    Raises:
        CheckpointError: a refused argument, or arguments the constructor does not take.
        ModelNotFoundError: the source does not resolve to a model ibnify can build.
    """
    kwargs = check_model_kwargs(model_kwargs, where)
    source_id = resolve_name(source)
    try:
        return build_model(source_id, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(
            f"{where}: model_kwargs {', '.join(sorted(kwargs))} do not fit {source_id} "
            f"({type(exc).__name__}: {first_line(exc, '')[:160]})"
        ) from exc
