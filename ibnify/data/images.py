"""Image data for fine-tuning and evaluation: ImageFolder directories and plain image batches.

Every dataset here yields images as float tensors in [0, 1], *not* normalised: appearance shifts
(``ibnify.evaluation``) act on pixel values, and normalisation (mean/std from timm's data config
for the model) is applied afterwards, on the batch, by :class:`Normalize`. ImageFolder transforms
come from ``timm.data.resolve_data_config`` and ``create_transform`` for the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ..errors import IbnifyError

__all__ = [
    "DataError",
    "ImageData",
    "Normalize",
    "UnlabeledImages",
    "data_config",
    "image_files",
    "image_folder_data",
    "load_images",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class DataError(IbnifyError):
    """A data directory or data set is missing, empty or unusable for the requested task."""


@dataclass
class ImageData:
    """A dataset of ``(image in [0, 1], label)`` pairs and the normalisation the model expects.

    ``labelled`` is False for a folder of images without class sub-folders (labels are -1):
    usable for label-free distillation only.
    """

    dataset: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None = None
    labelled: bool = True
    name: str = ""

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, applied to batches on the model's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def data_config(model: nn.Module, input_size: Sequence[int] | None = None) -> dict:
    """timm's data config for ``model`` (input size, interpolation, crop, mean, std).

    ``input_size`` (C, H, W) replaces the model's default size (a model converted for 32-px
    images is fed 32-px images, not upsampled to timm's 224).
    """
    given = {"input_size": tuple(int(v) for v in input_size)} if input_size is not None else {}
    return resolve_data_config(given, model=model)


class UnlabeledImages(Dataset):
    """All images under a directory (recursively), with label -1: for label-free fine-tuning."""

    def __init__(self, root: str | os.PathLike[str], transform=None) -> None:
        self.root = Path(root)
        self.files = image_files(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rgb = load_rgb_image(self.files[index])
        return (self.transform(rgb) if self.transform else rgb), -1


def load_rgb_image(path: str | os.PathLike[str]):
    """Open an image as RGB; a corrupt or unreadable file raises DataError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"image {str(path)!r} is corrupt or not an image ({exc.__class__.__name__})"
        ) from exc


def image_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``root`` (recursively, by suffix), sorted for a stable order."""
    return sorted(
        p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def load_images(
    directory: str | os.PathLike[str],
    size: tuple[int, int],
    limit: int = 8,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> torch.Tensor:
    """Up to ``limit`` images from ``directory`` (recursively), resized and normalised: a batch.

    For checks on real pixels (``ibnify verify --images``), not for training: no crop, no
    augmentation, a plain bilinear resize to ``size`` (H, W).
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"image directory {str(root)!r} does not exist")
    files = image_files(root)[:limit]
    if not files:
        raise DataError(f"no images (.jpg, .png, ...) found under {str(root)!r}")
    mean_array = np.array(mean, dtype=np.float32)
    std_array = np.array(std, dtype=np.float32)
    batch = []
    for file in files:
        rgb = load_rgb_image(file).resize((size[1], size[0]), Image.BILINEAR)
        array = (np.asarray(rgb, dtype=np.float32) / 255.0 - mean_array) / std_array
        batch.append(array.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(batch))


def image_folder_data(
    root: str | os.PathLike[str],
    model: nn.Module,
    train: bool = False,
    input_size: Sequence[int] | None = None,
) -> ImageData:
    """An image directory as :class:`ImageData`, with timm's transforms for ``model``.

    ``root/CLASS/*.jpg`` gives a labelled ImageFolder; a directory of images without class
    sub-folders gives unlabelled images (for ``--distill-from``). Training uses timm's training
    augmentation (random resized crop, flip); evaluation its resize + centre crop; both at
    ``input_size`` (C, H, W) when given, else at the model's default size.
    """
    directory = Path(root)
    if not directory.is_dir():
        raise DataError(f"data directory {str(directory)!r} does not exist or is not a directory")
    config = data_config(model, input_size)
    # Without normalisation timm's transform ends in uint8 tensors (0-255): scale them to
    # [0, 1], where the appearance shifts and Normalize expect them.
    transform = transforms.Compose(
        [
            create_transform(
                **{k: v for k, v in config.items() if k not in ("mean", "std")},
                is_training=train,
                normalize=False,
            ),
            transforms.ConvertImageDtype(torch.float32),
        ]
    )
    mean = tuple(float(v) for v in config["mean"])
    std = tuple(float(v) for v in config["std"])
    class_dirs = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if class_dirs:
        try:
            dataset = ImageFolder(str(directory), transform=transform, loader=load_rgb_image)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"data directory {str(directory)!r}: {exc}") from exc
        logger.info("%s: %d images in %d classes", directory, len(dataset), len(dataset.classes))
        return ImageData(dataset, mean, std, len(dataset.classes), True, directory.name)
    unlabeled = UnlabeledImages(directory, transform)
    if len(unlabeled) == 0:
        raise DataError(
            f"data directory {str(directory)!r} holds no images (expected CLASS/IMAGE files "
            "or, for label-free fine-tuning, image files)"
        )
    return ImageData(unlabeled, mean, std, None, False, directory.name)
