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
    "unreadable_images",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
# What PIL raises for a file it cannot decode (a corrupt, truncated or foreign file).
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
# How many unreadable files a message names before it says "and N more".
_NAMES_SHOWN = 10


class DataError(IbnifyError):
    """A data directory or data set is missing, empty or unusable for the requested task."""


@dataclass
class ImageData:
    """A dataset of ``(image in [0, 1], label)`` pairs and the normalisation the model expects.

    ``labelled`` is False for a folder of images without class sub-folders (labels are -1):
    usable for label-free distillation only. ``skipped`` names the unreadable files left out
    (``skip_bad_images=True``), relative to the folder.
    """

    dataset: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None = None
    labelled: bool = True
    name: str = ""
    skipped: tuple[str, ...] = ()

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

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform=None,
        files: Sequence[Path] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = list(files) if files is not None else image_files(self.root)
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
    except _UNREADABLE as exc:
        raise DataError(
            f"image {str(path)!r} is corrupt or not an image ({exc.__class__.__name__})"
        ) from exc


def _readable(path: Path) -> bool:
    """Whether PIL decodes ``path`` to the end (a JPEG at 1/8 scale: every byte is still
    entropy-decoded, so a truncated file shows, at a fraction of a full decode's cost)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except _UNREADABLE:
        return False
    return True


def unreadable_images(files: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files among ``files`` that cannot be decoded as images, in their order: found all
    at once before a run starts, instead of one failed run (or epoch) per file."""
    return [Path(f) for f in files if not _readable(Path(f))]


def _listed(root: Path, files: Sequence[Path]) -> str:
    """``a.png, cat/b.jpg and 3 more``: the files relative to ``root``, the first ten named."""
    names = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _drop_unreadable(root: Path, files: Sequence[Path], skip: bool) -> tuple[Path, ...]:
    """Check every file of a folder before any is used: without ``skip`` the unreadable ones
    are refused in one DataError that lists them; with it they are returned (and logged once)
    for the caller to leave out."""
    bad = unreadable_images(files)
    if not bad:
        return ()
    count = len(bad)
    if not skip:
        where = repr(str(root))
        what = (
            f"1 image in {where} is corrupt or not an image"
            if count == 1
            else f"{count} images in {where} are corrupt or not images"
        )
        them = "it" if count == 1 else "them"
        raise DataError(
            f"{what}: {_listed(root, bad)}; remove {them} or pass `skip_bad_images=True` to "
            f"leave {them} out"
        )
    logger.warning(
        "skipped %d unreadable image%s in %s: %s",
        count,
        "" if count == 1 else "s",
        root,
        _listed(root, bad),
    )
    return tuple(bad)


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
    *,
    skip_bad_images: bool = False,
) -> torch.Tensor:
    """Up to ``limit`` images from ``directory`` (recursively), resized and normalised: a batch.

    For checks on real pixels (``ibnify verify --images``), not for training: no crop, no
    augmentation, a plain bilinear resize to ``size`` (H, W). Files are taken in order until
    ``limit`` readable ones are found; the unreadable ones met on the way are refused in one
    DataError that lists them, or left out with ``skip_bad_images``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"image directory {str(root)!r} does not exist")
    files: list[Path] = []
    met_bad: list[Path] = []
    for file in image_files(root):
        if len(files) == limit:
            break
        (met_bad if unreadable_images([file]) else files).append(file)
    _drop_unreadable(root, met_bad, skip_bad_images)
    if not files:
        raise DataError(f"no readable images (.jpg, .png, ...) found under {str(root)!r}")
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
    *,
    skip_bad_images: bool = False,
) -> ImageData:
    """An image directory as :class:`ImageData`, with timm's transforms for ``model``.

    ``root/CLASS/*.jpg`` gives a labelled ImageFolder; a directory of images without class
    sub-folders gives unlabelled images (for ``teacher``). Training uses timm's training
    augmentation (random resized crop, flip); evaluation its resize + centre crop; both at
    ``input_size`` (C, H, W) when given, else at the model's default size.

    Every image is decoded once first: unreadable ones are refused in one DataError that lists
    them, or with ``skip_bad_images`` left out (``ImageData.skipped`` names them, one warning
    says how many); a skipped file never changes another image's class.
    """
    directory = Path(root)
    if not directory.is_dir():
        raise DataError(f"data directory {str(directory)!r} does not exist or is not a directory")
    config = data_config(model, input_size)
    transform = _unnormalised_transform(config, train)
    mean = tuple(float(v) for v in config["mean"])
    std = tuple(float(v) for v in config["std"])
    class_dirs = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if class_dirs:
        try:
            dataset = ImageFolder(str(directory), transform=transform, loader=load_rgb_image)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"data directory {str(directory)!r}: {exc}") from exc
        files = [Path(path) for path, _ in dataset.samples]
        skipped = _drop_unreadable(directory, files, skip_bad_images)
        if skipped:
            _keep_samples(dataset, set(skipped))
        logger.info("%s: %d images in %d classes", directory, len(dataset), len(dataset.classes))
        names = tuple(_listed(directory, [f]) for f in skipped)
        return ImageData(dataset, mean, std, len(dataset.classes), True, directory.name, names)
    files = image_files(directory)
    if not files:
        raise DataError(
            f"data directory {str(directory)!r} holds no images (expected CLASS/IMAGE files "
            "or, for label-free fine-tuning, image files)"
        )
    skipped = _drop_unreadable(directory, files, skip_bad_images)
    kept = [f for f in files if f not in set(skipped)]
    if not kept:
        raise DataError(f"data directory {str(directory)!r} holds no readable images")
    unlabeled = UnlabeledImages(directory, transform, kept)
    names = tuple(_listed(directory, [f]) for f in skipped)
    return ImageData(unlabeled, mean, std, None, False, directory.name, names)


def _unnormalised_transform(config: dict, train: bool) -> transforms.Compose:
    """timm's transform for ``config`` without its normalisation, ending in [0, 1] floats:
    without it timm's transform ends in uint8 tensors (0-255), and the appearance shifts and
    :class:`Normalize` expect [0, 1]."""
    return transforms.Compose(
        [
            create_transform(
                **{k: v for k, v in config.items() if k not in ("mean", "std")},
                is_training=train,
                normalize=False,
            ),
            transforms.ConvertImageDtype(torch.float32),
        ]
    )


def _keep_samples(dataset: ImageFolder, skipped: set[Path]) -> None:
    """Leave ``skipped`` out of an ImageFolder's samples; classes and their indices stay as the
    folder names give them, so every kept image keeps its label."""
    kept = [(path, label) for path, label in dataset.samples if Path(path) not in skipped]
    if not kept:
        raise DataError(f"data directory {dataset.root!r} holds no readable images")
    dataset.samples = kept
    dataset.imgs = kept
    dataset.targets = [label for _, label in kept]
