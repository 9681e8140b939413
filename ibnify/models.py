"""Model sources: resolve a name to a torchvision or timm model, and load local weights safely.

``resnet50`` resolves torchvision first, then timm; ``tv:NAME`` and ``timm:NAME`` force one.
Weights files are read with ``torch.load(weights_only=True)`` or safetensors only, so loading a
file never runs code from it.
"""

from __future__ import annotations

import difflib
import os
import pickle
import zipfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelNotFoundError, WeightsError, first_line

__all__ = [
    "SOURCES",
    "build_model",
    "clean_state_dict",
    "describe_key_mismatch",
    "load_state_dict_file",
    "resolve_name",
]

SOURCES = ("tv", "timm", "ibnify")
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_ema", "net", "weights")


@cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _local_names() -> tuple[str, ...]:
    from .small_models import MODELS

    return tuple(MODELS)


@cache
def _timm_names() -> tuple[str, ...]:
    import timm

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
            import torchvision

            weights = "DEFAULT" if pretrained else None
            model = torchvision.models.get_model(bare, weights=weights, **kwargs)
        elif source == "ibnify":
            from .small_models import MODELS

            if pretrained:
                raise WeightsError(f"{source_id} has no pretrained weights; use --weights FILE")
            model = MODELS[bare](**kwargs)
        else:
            import timm

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
        import torchvision

        try:
            url = torchvision.models.get_model_weights(bare).DEFAULT.url
        except (ValueError, AttributeError, KeyError):
            return None, False
        cached = Path(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1]).is_file()
        return url, cached
    import timm

    cfg = timm.models.get_pretrained_cfg(bare)
    if cfg is None:
        return None, False
    if cfg.hf_hub_id:
        import huggingface_hub
        from huggingface_hub import constants

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
    import socket
    from urllib.parse import urlparse

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
    import urllib.error

    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, urllib.error.URLError | ConnectionError | TimeoutError | OSError):
            return True
        text = str(chain).lower()
        if any(word in text for word in ("download", "connection", "resolve", "network", "hub")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style containers and strip ``module.``/``_orig_mod.``.

    Raises:
        WeightsError: the object is not a mapping of names to tensors.
    """
    for key in _WRAPPER_KEYS:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner and _all_tensors(inner):
            state = inner
            break
    if not isinstance(state, Mapping) or not state:
        raise WeightsError("the file holds no state dict (expected a mapping of names to tensors)")
    if not _all_tensors(state):
        bad = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise WeightsError(
            f"the file is not plain weights: entry {bad!r} is a {type(state[bad]).__name__}"
        )
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    changed = True
        cleaned[name] = value
    return cleaned


def _all_tensors(mapping: Mapping[str, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors``, ``.pth``/``.pt``/``.bin`` weights file safely and clean it.

    Raises:
        WeightsError: missing, a directory, empty, corrupt, truncated, or not plain weights.
    """
    file = Path(path)
    if not file.exists():
        raise WeightsError(f"weights file {str(file)!r} does not exist")
    if file.is_dir():
        raise WeightsError(f"weights path {str(file)!r} is a directory, not a file")
    if file.stat().st_size == 0:
        raise WeightsError(f"weights file {str(file)!r} is empty")
    if file.suffix == ".safetensors" or _has_safetensors_header(file):
        return clean_state_dict(_load_safetensors(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _looks_like_pickle(file) or zipfile.is_zipfile(file):
            raise WeightsError(
                f"refusing to load {str(file)!r}: it is a pickle that is not plain weights "
                "(torch.load with weights_only=True rejected it); ibnify never unpickles "
                "arbitrary objects — save a state dict of tensors or use safetensors"
            ) from exc
        raise WeightsError(
            f"weights file {str(file)!r} is corrupt or truncated: not a readable checkpoint"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = first_line(exc)
        raise WeightsError(
            f"weights file {str(file)!r} is corrupt or truncated ({first[:160]})"
        ) from exc
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"weights file {str(file)!r} holds a {type(state).__name__}, not a state dict"
        )
    return clean_state_dict(state)


def _looks_like_pickle(file: Path) -> bool:
    """A bare pickle (protocol 2+) starts with the PROTO opcode."""
    with file.open("rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _has_safetensors_header(file: Path) -> bool:
    with file.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = first_line(exc)
        raise WeightsError(
            f"weights file {str(file)!r} is not a valid safetensors file ({first[:160]})"
        ) from exc


def describe_key_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], limit: int = 3
) -> str:
    """One-line summary of missing, unexpected and wrongly shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shape = [
        k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
        if keys:
            shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts) if parts else "keys and shapes match"
