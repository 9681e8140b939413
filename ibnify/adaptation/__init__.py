"""Test-time adaptation: a trained model fitted to a target domain from unlabelled images.

Two methods. ``bn`` (AdaBN, the default): the BN statistics re-estimated on the target images
(:mod:`.statistics`). ``entropy`` (TENT-style, with EATA's sample filter and a collapse
warning): the chosen norms' affine parameters, BN and/or IN, learn to make the predictions
confident, then the statistics as ``bn`` (:mod:`.entropy`). Offline, :func:`adapt` returns an
adapted copy (:mod:`.offline`) and :func:`adapt_file` writes one (:mod:`.files`); online,
:class:`OnlineAdapter` adapts batch by batch while it predicts. See docs/adapt.md.
"""

from __future__ import annotations

from .entropy import CollapseGuard, OnlineAdapter, affine_parameters, prediction_entropy
from .files import AdaptResult, adapt_file
from .offline import adapt, adaptations
from .options import (
    COLLAPSE_FRACTION,
    DEFAULT_LR,
    E_MARGIN_FRACTION,
    METHODS,
    NORM_CHOICES,
    AdaptOptions,
    check_prior,
)
from .statistics import adaptable_norms

__all__ = [
    "COLLAPSE_FRACTION",
    "DEFAULT_LR",
    "E_MARGIN_FRACTION",
    "METHODS",
    "NORM_CHOICES",
    "AdaptOptions",
    "AdaptResult",
    "CollapseGuard",
    "OnlineAdapter",
    "adapt",
    "adapt_file",
    "adaptable_norms",
    "adaptations",
    "affine_parameters",
    "check_prior",
    "prediction_entropy",
]
