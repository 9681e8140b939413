"""The choice lists and defaults the library and the command line share; imports nothing.

One home for the names a user may type (export profiles, fold forms, engines, built-in data
sets, optimizers, shift names) and for the fine-tuning defaults: the library modules define
theirs by importing them from here, and the CLI reads them from here without loading torch, so
``ibnify --help`` stays fast and the two can never drift apart.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = [
    "BUILTIN_DATASETS",
    "ENGINES",
    "FINETUNE_DEFAULTS",
    "FOLD_FORMS",
    "ONNX_OPSETS",
    "OPTIMIZERS",
    "PROFILES",
    "SHIFT_DESCRIPTIONS",
    "SHIFT_GROUPS",
    "SHIFT_NAMES",
]

# ONNX export (ibnify.deploy.export / fold / engines).
PROFILES = ("default", "fp16", "portable")
FOLD_FORMS = ("auto", "concat", "split")
ENGINES = ("onnxruntime", "openvino")
# Opsets ibnify exports: 17 is the first with InstanceNormalization and Split sizes as an
# input; 20 is the newest the TorchScript exporter (torch 2.14) writes.
ONNX_OPSETS = range(17, 21)

# Data (ibnify.data.sources, ibnify.data.shifts).
BUILTIN_DATASETS = ("digits",)
DIGITS_SIZE = 16  # the digits set's default side, in pixels
SHIFT_DESCRIPTIONS = MappingProxyType(
    {
        "brightness_up": "pixel values ×1.4 (clipped)",
        "brightness_down": "pixel values ×0.5 (darker)",
        "contrast_up": "contrast ×1.5 around the image mean (clipped)",
        "contrast_down": "contrast ×0.5 around the image mean",
        "rgb_plus_50": "+50/255 on every channel (paper's RGB+50)",
        "r_plus_50": "+50/255 on the red channel only (paper's R+50)",
        "gamma": "gamma 2.0 (darker mid-tones)",
        "blur": "Gaussian blur, sigma 1 px",
        "noise": "Gaussian noise, sigma 0.08, fixed seed",
    }
)
SHIFT_NAMES = tuple(SHIFT_DESCRIPTIONS)
SHIFT_GROUPS = MappingProxyType(
    {
        "brightness": ("brightness_up", "brightness_down"),
        "contrast": ("contrast_up", "contrast_down"),
        "color": ("rgb_plus_50", "r_plus_50"),
        "colour": ("rgb_plus_50", "r_plus_50"),
    }
)

# Fine-tuning (ibnify.train.config.FinetuneConfig's defaults; the CLI's option defaults).
OPTIMIZERS = ("sgd", "adamw")
FINETUNE_DEFAULTS = MappingProxyType(
    {
        "epochs": 5,
        "lr": 0.01,
        "batch_size": 64,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "decay_norm_and_bias": True,
        "decay_in_affine": True,
        "warmup_epochs": 1.0,
        "min_lr": 0.0,
        "distill_temperature": 4.0,
        "seed": 0,
        "workers": 0,
    }
)
