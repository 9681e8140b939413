"""Fine-tuning from files, as ``ibnify finetune`` does it: a checkpoint, a data folder or the
digits set, a teacher by name or file."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import resolve_model
from ..data.images import image_folder_data
from ..data.sources import check_data_source, resolve_data_source
from ..errors import CheckpointError, InvalidOptionError
from ..models.checkpoint import input_size_for, load, needs_base, read_recipe, recipe_of_file
from ..models.registry import build_model
from ..models.weights import load_state_dict_file, load_weights
from .checks import check_fits
from .config import FinetuneConfig
from .loop import FinetuneResult, finetune, fresh_head

__all__ = ["TEACHER_ADVICE", "finetune_files", "load_teacher"]


# What a teacher named for ``--distill-from`` suggests when its pretrained weights are out of reach.
TEACHER_ADVICE = "pass a local weights file instead: --distill-from FILE"


def load_teacher(spec: str, recipe: dict[str, Any]) -> nn.Module:
    """The original (unconverted) model for ``--distill-from``.

    ``spec`` is an ibnify checkpoint, a plain weights file of the student's base architecture
    (built from the student's recipe, loaded strictly), or a model name (built with the
    library's pretrained weights and its own head, by :func:`ibnify.api.resolve_model`;
    offline, the advice names ``--distill-from FILE``).
    """
    path = Path(spec)
    kwargs = dict(recipe.get("model_kwargs", {}))
    if path.is_file():
        try:
            read_recipe(path)
        except CheckpointError:
            model, _ = build_model(recipe["source"], **kwargs)
            load_weights(model, load_state_dict_file(path), what=f"teacher weights {spec!r}")
            return model
        return load(path)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or os.sep in spec:
        raise CheckpointError(f"teacher file {spec!r} does not exist")
    kwargs.pop("num_classes", None)  # a fresh head would teach nothing; a misfit is refused
    return resolve_model(spec, pretrained=True, model_kwargs=kwargs, advice=TEACHER_ADVICE).model


def _load_student(checkpoint: str | os.PathLike[str]) -> nn.Module:
    """The checkpoint's model; one made from a class no registry knows is refused with the
    Python call that fine-tunes it (the command cannot build its base model)."""
    recipe = recipe_of_file(checkpoint)
    if needs_base(recipe):
        raise CheckpointError(
            f"{str(checkpoint)!r} holds a {recipe.base_class_name} ({recipe.base_class}), a "
            "class ibnify cannot build by name, so ibnify finetune cannot load it; fine-tune "
            f"it in Python: ibnify.finetune(ibnify.load(path, base={recipe.base_class_name}"
            "(...)), data, out_dir=...)"
        )
    return load(checkpoint)


def finetune_files(
    checkpoint: str | os.PathLike[str],
    config: FinetuneConfig,
    *,
    data: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    val_data: str | os.PathLike[str] | None = None,
    distill_from: str | None = None,
    force: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    num_classes: int | None = None,
    input_size: int | Sequence[int] | None = None,
) -> FinetuneResult:
    """What ``ibnify finetune`` does: load an ibnify checkpoint and its data, then fine-tune.

    Image folders are read at ``input_size`` (default: the size the checkpoint records, else
    the model's own default), so a model converted for 32-px images is not fed 224-px ones.

    ``data`` is an ImageFolder directory (or, with ``distill_from``, any folder of images);
    ``dataset="digits"`` uses the digits demo set (its test split validates by default).
    ``num_classes`` gives the loaded model a fresh classifier head of that size first.
    A head or teacher that does not fit the data is refused with the CLI's advice.
    The result lands in ``config.out_dir`` as ``model.safetensors`` (an ibnify checkpoint),
    ``checkpoint.pt`` (training state for ``--resume``) and ``metrics.jsonl``.
    """
    check_data_source(data, dataset)
    if not config.out_dir:
        raise InvalidOptionError("give an output directory (--out DIR)")
    model = _load_student(checkpoint)
    recipe = read_recipe(checkpoint)
    if num_classes is not None:
        fresh_head(model, num_classes, config.seed)
    size = input_size_for(model, input_size)
    train_data = resolve_data_source(
        data, dataset, model, split="train", seed=config.seed, input_size=size
    )
    # The digits set validates on its test split by default; a folder only with --val-data.
    validation = None
    if dataset is not None:
        validation = resolve_data_source(
            None, dataset, model, split="test", seed=config.seed, input_size=size
        )
    if val_data is not None:
        validation = image_folder_data(val_data, model, train=False, input_size=size)
    teacher = load_teacher(distill_from, recipe) if distill_from else None
    check_fits(model, train_data, teacher, torch.device("cpu"), cli=True, val_data=validation)
    return finetune(
        model,
        train_data,
        config,
        teacher=teacher,
        val_data=validation,
        force=force,
        on_epoch=on_epoch,
    )
