"""The appearance shifts: deterministic photometric changes of images in [0, 1].

They act on pixel values before the model's normalisation, as a camera or a different domain
would: brightness and contrast up and down, the IBN-Net paper's colour offsets (RGB +50 and R +50
on a 0-255 scale), gamma, blur and noise. Noise uses a fixed seed per batch, so a table can be
reproduced exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..constants import SHIFT_DESCRIPTIONS, SHIFT_GROUPS
from ..errors import InvalidOptionError

__all__ = ["CLEAN", "SHIFTS", "SHIFT_DESCRIPTIONS", "SHIFT_GROUPS", "apply_shift", "parse_shifts"]

ShiftFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_OFFSET_50 = 50.0 / 255.0


def _per_image_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(1, 2, 3), keepdim=True)


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.0, size: int = 5) -> torch.Tensor:
    coords = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(x.shape[1], 1, size, size)
    padded = F.pad(x, [size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=x.shape[1])


def _red_plus_50(x: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    out = x.clone()
    out[:, 0] = (out[:, 0] + _OFFSET_50).clamp(0.0, 1.0)
    return out


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * 0.08
    return (x + noise.to(x.device)).clamp(0.0, 1.0)


SHIFTS: dict[str, ShiftFn] = {
    "brightness_up": lambda x, _: (x * 1.4).clamp(0.0, 1.0),
    "brightness_down": lambda x, _: x * 0.5,
    "contrast_up": lambda x, _: (_per_image_mean(x) + 1.5 * (x - _per_image_mean(x))).clamp(
        0.0, 1.0
    ),
    "contrast_down": lambda x, _: _per_image_mean(x) + 0.5 * (x - _per_image_mean(x)),
    "rgb_plus_50": lambda x, _: (x + _OFFSET_50).clamp(0.0, 1.0),
    "r_plus_50": _red_plus_50,
    "gamma": lambda x, _: x.clamp(0.0, 1.0) ** 2.0,
    "blur": lambda x, _: _gaussian_blur(x),
    "noise": _noise,
}
"""Shift name → function of (images in [0, 1], generator). Names match the CLI's ``--shift``."""

CLEAN = "clean"


def parse_shifts(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"all"``, a comma list of shift or group names, or a sequence of them → shift names.

    Raises:
        InvalidOptionError: an unknown name; the message lists the valid ones.
    """
    if spec is None:
        return tuple(SHIFTS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for raw in items:
        item = raw.strip().lower().replace("-", "_").replace("+", "_plus_")
        item = item.replace("__", "_")
        if not item:
            continue
        if item == "all":
            names.extend(SHIFTS)
        elif item == "none":
            continue
        elif item in SHIFT_GROUPS:
            names.extend(SHIFT_GROUPS[item])
        elif item in SHIFTS:
            names.append(item)
        else:
            valid = ", ".join(["all", *SHIFT_GROUPS, *SHIFTS])
            raise InvalidOptionError(f"unknown shift {raw.strip()!r}; choose from: {valid}")
    return tuple(dict.fromkeys(names))


def apply_shift(
    name: str, images: torch.Tensor, seed: int = 0, batch_index: int = 0
) -> torch.Tensor:
    """Apply shift ``name`` to a batch of images in [0, 1]; deterministic for a given seed.

    ``name`` may be ``"clean"`` (returns the input unchanged).
    """
    if name == CLEAN:
        return images
    if name not in SHIFTS:
        raise InvalidOptionError(f"unknown shift {name!r}; choose from: {', '.join(SHIFTS)}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index)
    return SHIFTS[name](images, generator)
