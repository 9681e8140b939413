"""The digits demo set: scikit-learn's real handwritten digits as small RGB images.

The only module of ibnify that imports scikit-learn, so that deployment code (``deploy/``) and
image folders never load it.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from ..constants import DIGITS_SIZE
from ..models.small import DIGITS_MEAN, DIGITS_STD
from .images import DataError, ImageData

__all__ = ["DIGITS_SIZE", "digits_data", "load_digits_images"]

# Foreground tint and background level of the rendered digits: a warm stroke on a dark-grey
# ground, away from 0 and 1 so that brightening and darkening both change every pixel.
_DIGITS_TINT = (1.0, 0.88, 0.76)
_DIGITS_BACKGROUND = 0.1
_DIGITS_INK = 0.8


def load_digits_images(
    size: int = DIGITS_SIZE, test_fraction: float = 1 / 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8×8 digits as 3-channel ``size``×``size`` images in [0, 1].

    Returns ``(train_x, train_y, test_x, test_y)``; the split is stratified and fixed by ``seed``.
    """
    digits = load_digits()
    ink = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != ink.shape[-1]:
        ink = nn.functional.interpolate(
            ink, size=(size, size), mode="bilinear", align_corners=False
        )
    tint = torch.tensor(_DIGITS_TINT).view(1, 3, 1, 1)
    images = (_DIGITS_BACKGROUND + _DIGITS_INK * ink * tint).clamp(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx_t, test_idx_t = torch.tensor(train_idx), torch.tensor(test_idx)
    return images[train_idx_t], labels[train_idx_t], images[test_idx_t], labels[test_idx_t]


def digits_data(split: str = "train", size: int = DIGITS_SIZE, seed: int = 0) -> ImageData:
    """The digits demo set (``split`` is ``"train"`` or ``"test"``) with its mean/std."""
    if split not in ("train", "test"):
        raise DataError(f"digits split must be 'train' or 'test', got {split!r}")
    train_x, train_y, test_x, test_y = load_digits_images(size=size, seed=seed)
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    return ImageData(
        TensorDataset(x, y), DIGITS_MEAN, DIGITS_STD, num_classes=10, name=f"digits-{split}"
    )
