"""What a fine-tuning run tells its user: one readable line per epoch, and on Ctrl-C which
finished epoch its files hold (so that the CLI can print the command that continues)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .state import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE

__all__ = ["FinetuneInterrupted", "format_epoch", "kept_on_interrupt"]


def format_epoch(metrics: dict[str, Any]) -> str:
    """One readable, rounded line for an epoch's metrics (``metrics.jsonl`` keeps them all).

    ``epoch 2/5  loss 0.412  acc 87.3%  lr 0.05  12.1 s`` (``agree`` instead of ``acc`` when
    distilling: agreement with the teacher), then ``val 85.0%`` with validation data.
    """
    name = "agree" if metrics.get("metric") == "teacher_agreement" else "acc"
    text = (
        f"epoch {metrics['epoch']}/{metrics['epochs']}  loss {metrics['loss']:.3f}  "
        f"{name} {100 * metrics['acc']:.1f}%  lr {metrics['lr']:.3g}  {metrics['seconds']:.1f} s"
    )
    if "val_acc" in metrics:
        text += f"  val {100 * metrics['val_acc']:.1f}%"
    return text


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`finetune`: which finished epoch the run's files in ``out_dir`` hold.

    A KeyboardInterrupt still (code that catches that sees it); ``kept`` says whether a run
    to continue with ``resume=True`` (``--resume``) was written.
    """

    def __init__(self, out_dir: Path | None, kept_epoch: int, epochs: int) -> None:
        self.out_dir, self.kept_epoch, self.epochs = out_dir, kept_epoch, epochs
        super().__init__(self._message())

    @property
    def kept(self) -> bool:
        return self.out_dir is not None and self.kept_epoch > 0

    def _message(self) -> str:
        during = f"interrupted in epoch {self.kept_epoch + 1}/{self.epochs}"
        if self.out_dir is None:
            return f"{during}; nothing was written (no output directory)"
        if not self.kept:
            return f"{during}, before any epoch finished; nothing was written"
        names = [CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE]
        files = ", ".join(n for n in names if (self.out_dir / n).is_file())
        return f"{during}; kept epoch {self.kept_epoch} in {self.out_dir}/ ({files})"


@contextmanager
def kept_on_interrupt(out_dir: Path | None, start_epoch: int, epochs: int) -> Iterator[list[int]]:
    """Yield a list the loop appends each epoch to once its files are written; turn Ctrl-C
    into :class:`FinetuneInterrupted` naming the last one."""
    finished = [start_epoch] if start_epoch else []
    try:
        yield finished
    except KeyboardInterrupt as exc:
        if isinstance(exc, FinetuneInterrupted):
            raise
        raise FinetuneInterrupted(out_dir, finished[-1] if finished else 0, epochs) from exc
