"""What is checked before any training step: the head fits the data, the teacher fits the
student, the model runs on the data's image size (one line each instead of a traceback)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.modules import modes_restored
from ..data.images import ImageData, Normalize
from ..errors import InvalidOptionError, first_line

__all__ = ["check_fits"]


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
    cli: bool = False,
    val_data: ImageData | None = None,
) -> None:
    """Refuse, before training, a head that does not fit the data (training or validation) or
    a teacher that does not fit the student: one dummy forward of each on one training image.

    ``cli`` words the advice as the ``ibnify finetune`` option instead of the Python argument.
    """
    image = data.dataset[0][0]
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        return  # not an image tensor: the first step reports what is wrong
    batch = Normalize(data.mean, data.std).to(device)(image.unsqueeze(0).float().to(device))
    classes = _class_scores(model, batch, "the model")
    if teacher is None and data.num_classes is not None and classes != data.num_classes:
        wanted = data.num_classes
        advice = f"--num-classes {wanted}" if cli else f"finetune(..., num_classes={wanted})"
        raise InvalidOptionError(
            f"the model's head has {classes} classes but the training data has {wanted}; "
            f"give it a fresh {wanted}-class head with {advice}"
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
