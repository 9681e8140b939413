"""Model sources: resolve a name to a torchvision or timm model, and load local weights safely.

``resnet50`` resolves torchvision first, then timm; ``tv:NAME`` and ``timm:NAME`` force one.
Weights files are read with ``torch.load(weights_only=True)`` or safetensors only, so loading a
file never runs code from it.
"""

from __future__ import annotations

import difflib
import socket
import urllib.error
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

from .errors import ModelNotFoundError, WeightsError
from .small_models import MODELS

__all__ = [
    "SOURCES",
    "build_model",
    "resolve_name",
]

SOURCES = ("tv", "timm", "ibnify")


@cache
def _torchvision_names() -> tuple[str, ...]:

    return tuple(torchvision.models.list_models(module=torchvision.models))


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
    raise ModelNotFoundError(_unknown_message(name, text, _torchvision_names() + _timm_names()))


def _unknown_message(original: str, bare: str, candidates: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(bare, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    return f"unknown model {original!r}{hint}"


def build_model(name: str, pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, str]:
    """Build a model by name; return ``(model, "source:name")``.

    ``kwargs`` go to the constructor (for example ``num_classes``). With ``pretrained`` the
    library's own download is used; offline that fails with a WeightsError suggesting --weights.
    """
    source_id = resolve_name(name)
    source, _, bare = source_id.partition(":")
    if pretrained:
        _check_weights_reachable(source, bare)
    try:
        if source == "tv":
            weights = "DEFAULT" if pretrained else None
            model = torchvision.models.get_model(bare, weights=weights, **kwargs)
        elif source == "ibnify":
            if pretrained:
                raise WeightsError(f"{source_id} has no pretrained weights; use --weights FILE")
            model = MODELS[bare](**kwargs)
        else:
            model = timm.create_model(bare, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained and _looks_like_download_failure(exc):
            raise WeightsError(
                f"could not download pretrained weights for {source_id} (no network?); "
                "pass a local file with --weights FILE instead"
            ) from exc
        raise
    return model, source_id


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
            f"{source}:{bare} has no pretrained weights to download; pass --weights FILE"
        )
    host = urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise WeightsError(
            f"could not download pretrained weights for {source}:{bare} ({host} is not "
            "reachable); pass a local file with --weights FILE instead"
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
