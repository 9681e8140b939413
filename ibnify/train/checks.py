"""What is checked before any training step: the head fits the data, the teacher fits the
student, the model runs on the data's image size, and a run that writes files can save its
model (one line each instead of a traceback, and nothing written)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.modules import modes_restored
from ..core.recipe import get_recipe
from ..data.images import ImageData, Normalize
from ..errors import CheckpointError, InvalidOptionError, first_line
from ..models.checkpoint import saved_recipe
from ..models.heads import num_classes_of

__all__ = ["check_fits", "check_savable"]


def _shape_text(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(str(int(v)) for v in shape)


@torch.no_grad()
def _class_scores(model: nn.Module, batch: torch.Tensor, what: str) -> int:
    """Run ``model`` once in eval mode on ``batch``; return its number of output classes.

    Every module's mode is restored; a forward that fails or gives no (N, classes) scores
    raises InvalidOptionError naming ``what`` and the input shape.
    """
    shape = _shape_text(batch.shape[1:])
    with modes_restored(model, requires_grad=True):
        model.eval()
        try:
            output = model(batch)
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
            raise InvalidOptionError(
                f"{what} does not run on the training images ({shape}): {first_line(exc)}"
            ) from exc
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        got = _shape_text(output.shape) if isinstance(output, torch.Tensor) else "no tensor"
        raise InvalidOptionError(
            f"{what} gives no class scores on the training images ({shape}): output {got}, "
            "fine-tuning needs (batch, classes)"
        )
    return int(output.shape[1])


def check_fits(
    model: nn.Module,
    data: ImageData,
    teacher: nn.Module | None,
    device: torch.device,
    val_data: ImageData | None = None,
) -> None:
    """Refuse, before training, a head that does not fit the data (training or validation) or
    a teacher that does not fit the student: one dummy forward of each on one training image.
    The advice names the parameter (the CLI rewrites it to its flag).
    """
    image = data.dataset[0][0]
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        return  # not an image tensor: the first step reports what is wrong
    batch = Normalize(data.mean, data.std).to(device)(image.unsqueeze(0).float().to(device))
    classes = _class_scores(model, batch, "the model")
    if teacher is None and data.num_classes is not None and classes != data.num_classes:
        wanted = data.num_classes
        raise InvalidOptionError(
            f"the model's head has {classes} classes but the training data has {wanted}; "
            f"give it a fresh {wanted}-class head with `num_classes={wanted}`"
        )
    if val_data is not None and val_data.num_classes not in (None, classes):
        raise InvalidOptionError(
            f"the model's head has {classes} classes but the validation data has "
            f"{val_data.num_classes}; validate on images of the classes it is trained on"
        )
    if teacher is None:
        return
    teacher_classes = _class_scores(teacher, batch, "the teacher")
    if teacher_classes != classes:
        raise InvalidOptionError(
            f"the teacher gives {teacher_classes} classes and the student {classes}; distil "
            "from the model the student was converted from (the same classes)"
        )


def check_savable(model: nn.Module, out_dir: str) -> None:
    """Refuse, before training, a model with a recipe (converted, or loaded from a checkpoint
    with no plan) that ``ibnify.save`` would refuse: a run with an output folder saves it after
    every epoch, and would otherwise fail after the first one.

    A model of a class no registry knows saves with its class name (it loads back with
    ``ibnify.load(path, base=MyNet(...))``); a model built by name must still be what its recipe
    rebuilds, so a head replaced by hand is refused with the ``num_classes`` advice.
    """
    recipe = get_recipe(model)
    if recipe is None:
        return  # no recipe (a plain module): the run writes its training state only
    where = f"finetune(..., out_dir={out_dir!r}) saves the model after every epoch"
    classes = num_classes_of(model)
    recorded = recipe.num_classes
    if recipe.source is not None and None not in (recorded, classes) and classes != recorded:
        raise InvalidOptionError(
            f"{where}, but its head has {classes} classes and its recipe {recorded} (a head "
            f"replaced by hand is not recorded); give the model a fresh head with "
            f"finetune(..., num_classes={classes}) instead"
        )
    try:
        # The checks of ibnify.save without the writing (it rebuilds the model from its recipe).
        saved_recipe(model, None, None)
    except CheckpointError as exc:
        raise InvalidOptionError(
            f"{where}, but it cannot be saved: {exc}; or fine-tune without out_dir and save it "
            "yourself"
        ) from exc
