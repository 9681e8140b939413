"""What an adaptation is asked to do: the method, the norms it may change and its settings.

One frozen record, checked when it is made, so a bad option (``lr=0``, an unknown method, an
entropy-only setting with ``method="bn"``) is refused before any image is read or file written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidOptionError

__all__ = [
    "COLLAPSE_FRACTION",
    "DEFAULT_LR",
    "E_MARGIN_FRACTION",
    "METHODS",
    "NORM_CHOICES",
    "AdaptOptions",
    "check_prior",
]

METHODS = ("bn", "entropy")
NORM_CHOICES = ("bn", "in", "both")
# SGD with momentum 0.9 on the norm affine (TENT's optimizer); the rate measured on the digits
# demo (docs/adapt.md): larger rates collapse the small-batch BN control first.
DEFAULT_LR = 0.005
# EATA's reliable-sample margin: a sample whose prediction entropy exceeds 0.4 * ln(C) adds
# nothing to the loss (EATA, Niu et al. 2022, use 0.4 * ln 1000 on ImageNet).
E_MARGIN_FRACTION = 0.4
# Collapse: the entropy of the mean prediction below 0.5 * ln(C), i.e. the predictions spread
# over fewer than sqrt(C) classes' worth (3.2 of 10, 32 of 1000), gives one warning.
COLLAPSE_FRACTION = 0.5


def check_prior(prior: Any) -> float:
    """``prior`` as a float in [0, 1]; InvalidOptionError otherwise."""
    try:
        value = float(prior)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"prior must be a number between 0 and 1, got {prior!r}") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidOptionError(f"prior must be between 0 and 1, got {prior!r}")
    return value


def _positive_int(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidOptionError(f"{name} must be a positive whole number, got {value!r}")


def _fraction(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise InvalidOptionError(f"{name} must be a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class AdaptOptions:
    """How :func:`ibnify.adapt` adapts a model (every field is checked when the record is made).

    ``images``: at most this many target images (a seeded random choice; None = all).
    ``prior``: weight of the source BN statistics in [0, 1] (0 = target only, 1 = no change).
    ``method``: ``"bn"`` (AdaBN: the BN statistics only) or ``"entropy"`` (TENT-style: the
    chosen norms' affine parameters minimise the prediction entropy, then the BN statistics are
    re-estimated as ``bn`` does). ``norms`` (entropy only): ``"bn"``, ``"in"`` or ``"both"``
    (None: both where the model has IN affine, else bn). ``epochs`` passes over the target
    images (entropy only; default 1), ``steps`` at most this many updates in all, ``lr`` the SGD
    rate (default :data:`DEFAULT_LR`), ``e_margin`` and ``collapse`` fractions of ln(C) for the
    sample filter and the collapse warning.
    """

    images: int | None = None
    prior: float = 0.0
    batch_size: int = 64
    seed: int = 0
    method: str = "bn"
    norms: str | None = None
    epochs: int | None = None
    steps: int | None = None
    lr: float | None = None
    e_margin: float = E_MARGIN_FRACTION
    collapse: float = COLLAPSE_FRACTION

    def __post_init__(self) -> None:
        check_prior(self.prior)
        _positive_int(self.images, "images")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise InvalidOptionError(f"batch size must be a whole number, got {self.batch_size!r}")
        if self.batch_size < 2:
            raise InvalidOptionError("batch size must be at least 2 to estimate a variance")
        if self.method not in METHODS:
            raise InvalidOptionError(
                f"unknown adaptation method {self.method!r}; choose {' or '.join(METHODS)}"
            )
        if self.norms is not None and self.norms not in NORM_CHOICES:
            raise InvalidOptionError(
                f"norms must be one of {', '.join(NORM_CHOICES)}, got {self.norms!r}"
            )
        _positive_int(self.epochs, "epochs")
        _positive_int(self.steps, "steps")
        if self.lr is not None and (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, int | float)
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise InvalidOptionError(f"lr must be a positive number, got {self.lr!r}")
        _fraction(self.e_margin, "e_margin")
        _fraction(self.collapse, "collapse")
        given = [n for n in ("norms", "epochs", "steps", "lr") if getattr(self, n) is not None]
        if self.method == "bn" and given:
            raise InvalidOptionError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to method "
                "'entropy' only (method 'bn' re-estimates "
                "statistics in one pass and learns nothing); add method='entropy'"
            )

    @property
    def learning_rate(self) -> float:
        """The SGD rate the entropy method uses."""
        return DEFAULT_LR if self.lr is None else float(self.lr)

    @property
    def passes(self) -> int:
        """Passes over the target images the entropy method makes."""
        return 1 if self.epochs is None else self.epochs

    def record(self, used: int, data_name: str, **found: Any) -> dict[str, Any]:
        """What a checkpoint records about this adaptation (``found``: what the run measured,
        such as the norms adapted and the updates made)."""
        record = {
            "kind": "adabn" if self.method == "bn" else "entropy",
            "data": data_name,
            "images": used,
            "prior": self.prior,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        if self.method == "entropy":
            record.update(
                epochs=self.passes,
                steps=self.steps,
                lr=self.learning_rate,
                e_margin=self.e_margin,
                collapse=self.collapse,
            )
        return {**record, **found}
