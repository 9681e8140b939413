"""``ibnify finetune`` from files: a checkpoint, a data folder or the digits set, a teacher by
name or file; its options record and :func:`finetune_files`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._io import check_output_dir
from ..api import resolve_model
from ..core.recipe import Recipe
from ..data.images import image_folder_data
from ..errors import CheckpointError, InvalidOptionError, WeightsError
from ..models.checkpoint import load, needs_base, read_recipe
from ..models.registry import build_model
from ..models.weights import load_state_dict_file, load_weights
from ..train.config import FinetuneConfig
from ..train.loop import FinetuneResult, finetune, fresh_head
from .inputs import InputRequest, resolve_inputs

__all__ = ["FinetuneFiles", "finetune_files", "load_teacher"]


@dataclass(frozen=True)
class FinetuneFiles:
    """What ``ibnify finetune`` reads besides the training config: the checkpoint, the data
    (``inputs``), a validation folder, a teacher, a fresh head's class count."""

    checkpoint: str | os.PathLike[str]
    inputs: InputRequest
    val_data: str | os.PathLike[str] | None = None
    distill_from: str | None = None
    num_classes: int | None = None
    force: bool = False

    def check(self, config: FinetuneConfig) -> None:
        """Refuse, before any model is built: the data source, the size, the output folder,
        ``resume`` with ``force``, a class count below 1."""
        self.inputs.check()
        if not config.out_dir:
            raise InvalidOptionError("give an output directory (`out_dir=DIR`)")
        if config.resume and self.force:
            raise InvalidOptionError("`resume` and `force` exclude each other")
        if self.num_classes is not None and self.num_classes < 1:
            raise InvalidOptionError(f"`num_classes={self.num_classes}` is below 1")
        check_output_dir(config.out_dir)


def load_teacher(spec: str, recipe: Recipe) -> nn.Module:
    """The original (unconverted) model for ``distill_from``.

    ``spec`` is an ibnify checkpoint, a plain weights file of the student's base architecture
    (built from the student's recipe, loaded strictly), or a model name (built with the
    library's pretrained weights and its own head, by :func:`ibnify.api.resolve_model`;
    offline, the advice names a local file for ``distill_from``).
    """
    path = Path(spec)
    kwargs = dict(recipe.model_kwargs)
    if path.is_file():
        try:
            read_recipe(path)
        except CheckpointError:
            model, _ = build_model(recipe.source, **kwargs)
            load_weights(model, load_state_dict_file(path), what=f"teacher weights {spec!r}")
            return model
        return load(path)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or os.sep in spec:
        raise CheckpointError(f"teacher file {spec!r} does not exist")
    kwargs.pop("num_classes", None)  # a fresh head would teach nothing; a misfit is refused
    try:
        return resolve_model(spec, pretrained=True, model_kwargs=kwargs).model
    except WeightsError as exc:
        raise WeightsError(_teacher_advice(str(exc))) from exc


def _teacher_advice(message: str) -> str:
    """A pretrained teacher out of reach: the advice names ``distill_from``, not ``weights``."""
    general = "pass a local file with `weights=FILE` instead"
    teacher = "pass a local weights file instead: `distill_from=FILE`"
    return message.replace(general, teacher) if general in message else message


def _load_student(checkpoint: str | os.PathLike[str]) -> nn.Module:
    """The checkpoint's model; one made from a class no registry knows is refused with the
    Python call that fine-tunes it (the command cannot build its base model)."""
    recipe = read_recipe(checkpoint)
    if needs_base(recipe):
        raise CheckpointError(
            f"{str(checkpoint)!r} holds a {recipe.base_class_name} ({recipe.base_class}), a "
            "class ibnify cannot build by name, so ibnify finetune cannot load it; fine-tune "
            f"it in Python: ibnify.finetune(ibnify.load(path, base={recipe.base_class_name}"
            "(...)), data, out_dir=...)"
        )
    return load(checkpoint)


def finetune_files(
    files: FinetuneFiles,
    config: FinetuneConfig,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """What ``ibnify finetune`` does: load an ibnify checkpoint and its data, then fine-tune.

    Image folders are read at the one size :func:`.inputs.resolve_inputs` decides, so a model
    converted for 32-px images is not fed 224-px ones. ``dataset="digits"`` validates on its
    test split by default; a folder only with ``val_data``. ``num_classes`` gives the model a
    fresh head first. The result lands in ``config.out_dir`` (model.safetensors,
    checkpoint.pt, metrics.jsonl).
    """
    files.check(config)
    student = _load_student(files.checkpoint)
    if files.num_classes is not None:
        fresh_head(student, files.num_classes, config.seed)
    inputs = resolve_inputs(files.inputs, student)
    train_data = inputs.data("train", config.seed)
    validation = None
    if files.inputs.dataset is not None:
        validation = inputs.data("test", config.seed, dataset_only=True)
    if files.val_data is not None:
        validation = image_folder_data(
            files.val_data,
            student,
            train=False,
            input_size=inputs.input_size,
            skip_bad_images=files.inputs.skip_bad_images,
        )
    recipe = read_recipe(files.checkpoint)
    teacher = load_teacher(files.distill_from, recipe) if files.distill_from else None
    return finetune(
        student,
        train_data,
        config,
        teacher=teacher,
        val_data=validation,
        force=files.force,
        on_epoch=on_epoch,
    )
