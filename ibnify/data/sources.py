"""Which data a command names: an image folder or a built-in data set, exactly one of them;
and the one conversion of what a Python caller passes (a folder path, a data set name, a
Dataset or ImageData) into :class:`ImageData`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from .. import data as data_face  # digits (and scikit-learn) load on first use, not here
from ..constants import BUILTIN_DATASETS, DIGITS_SIZE
from ..errors import InvalidOptionError
from .images import DataError, ImageData, image_folder_data

__all__ = ["BUILTIN_DATASETS", "as_image_data", "check_data_source", "resolve_data_source"]


def check_data_source(data: str | os.PathLike[str] | None, dataset: str | None) -> None:
    """Exactly one of an image folder and a built-in data set; InvalidOptionError otherwise."""
    if (data is None) == (dataset is None):
        raise InvalidOptionError("give either `data=DIR` or `dataset=digits`")
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
    input_size: Sequence[int] | None = None,
    skip_bad_images: bool = False,
) -> ImageData:
    """The data a command names: an image folder (timm's transforms for ``model``) or digits.

    ``split`` is ``"train"`` (training augmentation, the digits train split) or ``"test"``
    (evaluation transform, the digits test split). ``input_size`` (C, H, W) sets the folder
    transform's size (default: the model's) and the digits images' side (default 16).
    ``skip_bad_images``: leave a folder's unreadable images out instead of refusing them.
    """
    check_data_source(data, dataset)
    if dataset is not None:
        return data_face.digits_data(split, size=_square_side(input_size), seed=seed)
    return image_folder_data(  # type: ignore[arg-type]
        data,
        model,
        train=split == "train",
        input_size=input_size,
        skip_bad_images=skip_bad_images,
    )


def _square_side(input_size: Sequence[int] | None) -> int:
    """The digits images' side for ``input_size`` (C, H, W): H, which must equal W."""
    if input_size is None:
        return DIGITS_SIZE
    channels, height, width = (int(v) for v in input_size)
    if channels != 3 or height != width:
        raise InvalidOptionError(
            f"the digits set is square RGB; input size {channels},{height},{width} does not fit "
            "it (give a square size such as 32)"
        )
    return height


def as_image_data(
    data: ImageData | Dataset | str | os.PathLike[str],
    model: nn.Module,
    split: str = "test",
    *,
    seed: int = 0,
    input_size: Sequence[int] | None = None,
    skip_bad_images: bool = False,
) -> ImageData:
    """What the Python API accepts wherever the CLI takes ``--data``/``--dataset``, as ImageData.

    An :class:`ImageData` is returned as it is; a folder path is read as the CLI reads
    ``--data`` (timm's transforms for ``model``, ``split`` ``"train"`` or ``"test"``, at
    ``input_size`` when given); a built-in data set name (``"digits"``) that is not an existing
    path gives that set's ``split``; a plain ``Dataset`` is taken as already-normalised pairs.
    ``skip_bad_images`` leaves a folder's unreadable images out instead of refusing them.

    Raises:
        DataError: anything else, or a folder that is missing or holds no images.
    """
    if isinstance(data, ImageData):
        return data
    if isinstance(data, str | os.PathLike):
        if isinstance(data, str) and data in BUILTIN_DATASETS and not Path(data).exists():
            return resolve_data_source(
                None, data, model, split=split, seed=seed, input_size=input_size
            )
        return resolve_data_source(
            data,
            None,
            model,
            split=split,
            input_size=input_size,
            skip_bad_images=skip_bad_images,
        )
    if isinstance(data, Dataset):
        return ImageData(data, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), name="dataset")
    raise DataError(
        f"data is a {type(data).__name__}; give an image folder path, "
        f"{' or '.join(repr(n) for n in BUILTIN_DATASETS)}, an ImageData or a torch Dataset"
    )
