"""Labelled target domains (``--domain NAME=FOLDER``) and the one check that two data sets hold
the same classes, for every command that compares data: evaluate, analyze, search, adapt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import InvalidOptionError
from .images import DataError, ImageData
from .shifts import CLEAN, SHIFT_GROUPS, SHIFTS
from .sources import as_image_data

__all__ = ["check_same_classes", "domain_specs", "load_domains", "parse_domain"]


def parse_domain(spec: str) -> tuple[str, str]:
    """``"NAME=FOLDER"`` (the CLI's ``--domain``) → ``(name, folder)``; InvalidOptionError else."""
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidOptionError(f"`domains` {spec!r}: write NAME=FOLDER, e.g. night=photos/night")
    if not folder.strip():
        raise InvalidOptionError(f"`domains` {spec!r} names no folder; write {name}=FOLDER")
    return name, folder.strip()


def domain_specs(domains: Mapping[str, Any] | Sequence[str] | str | None) -> dict[str, Any]:
    """Domains as ``{name: folder or ImageData}``; names must be new and distinct."""
    if domains is None:
        return {}
    if isinstance(domains, Mapping):
        pairs = [(str(k), v) for k, v in domains.items()]
    elif isinstance(domains, str):
        pairs = [parse_domain(domains)]
    else:
        pairs = [parse_domain(item) for item in domains]
    found: dict[str, Any] = {}
    reserved = {CLEAN, "mean drop", *SHIFTS, *SHIFT_GROUPS}
    for name, value in pairs:
        if name in found:
            raise InvalidOptionError(f"domain {name!r} is given twice; give each name once")
        if name.lower() in reserved:
            raise InvalidOptionError(
                f"domain name {name!r} is taken by a shift or the clean row; choose another"
            )
        found[name] = value
    return found


def check_same_classes(first: ImageData, second: ImageData, what: str | None = None) -> None:
    """DataError when two data sets hold different classes: by name where both have names
    (image folders), else by count where both are known.

    ``what`` names the pair in the message (``"training and validation folders"``); None means
    ``second`` is a target domain of ``first`` and is named by its own name.
    """
    names = (getattr(first.dataset, "classes", None), getattr(second.dataset, "classes", None))
    if names[0] is not None and names[1] is not None:
        if list(names[0]) == list(names[1]):
            return
        only_first = ", ".join(sorted(set(names[0]) - set(names[1]))[:3]) or "-"
        only_second = ", ".join(sorted(set(names[1]) - set(names[0]))[:3]) or "-"
        if what is None:
            raise DataError(
                f"domain {second.name!r} holds other classes than the source data (source "
                f"only: {only_first}; {second.name} only: {only_second}); give a folder with "
                "the same CLASS sub-folders"
            )
        raise DataError(
            f"the {what} hold different class sets ({first.name!r} only: {only_first}; "
            f"{second.name!r} only: {only_second}); give folders with the same CLASS sub-folders"
        )
    counts = (first.num_classes, second.num_classes)
    if None not in counts and counts[0] != counts[1]:
        pair = f"domain {second.name!r} has" if what is None else f"the {what}: {second.name!r} has"
        raise DataError(
            f"{pair} {counts[1]} classes, the source data {counts[0]}; give a folder with the "
            "same CLASS sub-folders"
        )


def load_domains(
    domains: Mapping[str, Any] | Sequence[str] | str | None,
    model: nn.Module,
    source: ImageData | None = None,
    input_size: Sequence[int] | None = None,
    *,
    skip_bad_images: bool = False,
) -> dict[str, ImageData]:
    """Labelled target domains (``{name: folder or ImageData}`` or ``NAME=FOLDER`` strings),
    each named by its domain name and checked against the classes of ``source``;
    ``skip_bad_images`` leaves a folder's unreadable images out instead of refusing them.

    Raises:
        DataError: a folder without class sub-folders, without images, or with other classes
            than ``source``.
    """
    loaded: dict[str, ImageData] = {}
    for name, value in domain_specs(domains).items():
        try:
            data = as_image_data(
                value, model, "test", input_size=input_size, skip_bad_images=skip_bad_images
            )
        except DataError as exc:
            raise DataError(f"domain {name!r}: {exc}") from exc
        if not data.labelled:
            raise DataError(
                f"domain {name!r} has no class sub-folders; accuracy needs labels "
                "(CLASS/IMAGE files; `ibnify adapt` takes unlabelled images)"
            )
        if len(data) == 0:
            raise DataError(f"domain {name!r} holds no images")
        if source is not None:
            check_same_classes(source, _named(data, name))
        loaded[name] = data
    return loaded


def _named(data: ImageData, name: str) -> ImageData:
    """``data`` under the domain's name (for messages), sharing its dataset."""
    return ImageData(data.dataset, data.mean, data.std, data.num_classes, data.labelled, name)
