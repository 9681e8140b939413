"""Which data a command names: an image folder or a built-in data set, exactly one of them."""

from __future__ import annotations

import os

from torch import nn

from ..errors import InvalidOptionError
from .digits import digits_data
from .images import ImageData, image_folder_data

__all__ = ["BUILTIN_DATASETS", "check_data_source", "resolve_data_source"]

BUILTIN_DATASETS = ("digits",)


def check_data_source(data: str | os.PathLike[str] | None, dataset: str | None) -> None:
    """Exactly one of an image folder and a built-in data set; InvalidOptionError otherwise."""
    if (data is None) == (dataset is None):
        raise InvalidOptionError("give either --data DIR or --dataset digits")
    if dataset is not None and dataset not in BUILTIN_DATASETS:
        raise InvalidOptionError(
            f"unknown dataset {dataset!r}; the built-in one is {', '.join(BUILTIN_DATASETS)}"
        )


def resolve_data_source(
    data: str | os.PathLike[str] | None,
    dataset: str | None,
    model: nn.Module,
    *,
    split: str,
    seed: int = 0,
) -> ImageData:
    """The data a command names: an image folder (timm's transforms for ``model``) or digits.

    ``split`` is ``"train"`` (training augmentation, the digits train split) or ``"test"``
    (evaluation transform, the digits test split).
    """
    check_data_source(data, dataset)
    if dataset is not None:
        return digits_data(split, seed=seed)
    return image_folder_data(data, model, train=split == "train")  # type: ignore[arg-type]
