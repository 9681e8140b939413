"""Issue 21 section 3: ``--resume`` continues the uninterrupted run bit for bit on an image folder.

The runs consume every kind of randomness a real run draws from: the sampler's shuffle, timm's
training augmentation (random resized crop and flip, in the main process or in 2 loader
workers), and dropout in the model (the main process's torch RNG). Straight, stopped with
``--stop-after`` and resumed, or interrupted by Ctrl-C in the middle of an epoch and resumed:
the final weights and every epoch's metrics are equal bit for bit (the runs are in one process,
so bit equality is allowed). The training-state file refuses a pickle that is not plain data.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import ibnify
import ibnify.train.loop as loop
from ibnify.cli import cli
from ibnify.data.images import image_folder_data
from ibnify.errors import CheckpointError
from ibnify.models.registry import build_model
from ibnify.train.loop import finetune
from ibnify.train.progress import FinetuneInterrupted
from ibnify.train.state import CHECKPOINT_FILE, MODEL_FILE, load_training_state

pytestmark = pytest.mark.usefixtures("one_thread")

# timm's smallest ResNet (0.4 M parameters) with dropout before its head: the main process's
# torch RNG is drawn from at every step, also when 2 workers do the augmentation.
KWARGS = {"drop_rate": 0.3, "num_classes": 2}
SIZE = (3, 32, 32)
EPOCHS = 2


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A converted checkpoint and labelled train (12 images) and validation (4) folders."""
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    model, source = build_model("timm:test_resnet", **KWARGS)
    converted = ibnify.convert(
        model, stages=(1,), arch=source, model_kwargs=KWARGS, input_size=SIZE
    )
    ibnify.save(converted, root / "ibn.safetensors")
    return {
        "checkpoint": root / "ibn.safetensors",
        "train": write_folder(root / "train", 6, seed=1),
        "val": write_folder(root / "val", 2, seed=2),
    }


def finetune_args(setup: dict[str, Path], out: Path, workers: int, *extra: str) -> list[str]:
    return [
        *("finetune", str(setup["checkpoint"]), "--data", str(setup["train"])),
        *("--val-data", str(setup["val"]), "--epochs", str(EPOCHS), "--batch-size", "4"),
        *("--lr", "0.05", "--seed", "3", "--workers", str(workers), "--quiet"),
        *("--out", str(out), *extra),
    ]


def invoke(args: list[str], exit_code: int = 0) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == exit_code, result.output
    return result.output


def assert_same_run(a: Path, b: Path) -> None:
    """Equal weights and buffers bit for bit, and equal metrics for every epoch."""
    first, second = load_file(a / MODEL_FILE), load_file(b / MODEL_FILE)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert different == []
    timing = {"seconds", "images_per_s"}
    states = [load_training_state(run / CHECKPOINT_FILE) for run in (a, b)]
    history = [
        [{k: v for k, v in line.items() if k not in timing} for line in state["history"]]
        for state in states
    ]
    assert len(history[0]) == EPOCHS and history[0] == history[1]
    assert all("val_acc" in line for line in history[0])


def test_the_runs_consume_randomness(setup: dict[str, Path], tmp_path: Path) -> None:
    """The equality below proves something: augmentation is random, and the seed matters."""
    model = ibnify.load(setup["checkpoint"])
    data = image_folder_data(setup["train"], model, train=True, input_size=SIZE)
    torch.manual_seed(0)
    first = data.dataset[0][0]
    assert not torch.equal(first, data.dataset[0][0])  # random crop and flip
    invoke(finetune_args(setup, tmp_path / "a", 0))
    invoke(finetune_args(setup, tmp_path / "b", 0, "--seed", "4"))  # the last --seed wins
    a, b = load_file(tmp_path / "a" / MODEL_FILE), load_file(tmp_path / "b" / MODEL_FILE)
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_after_then_resume_equals_the_straight_run(
    setup: dict[str, Path], tmp_path: Path, workers: int
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    invoke(finetune_args(setup, straight, workers))
    output = invoke(finetune_args(setup, stopped, workers, "--stop-after", "1"))
    assert output.startswith("stopped; continue with --resume")
    assert load_training_state(stopped / CHECKPOINT_FILE)["epoch"] == 1
    invoke(finetune_args(setup, stopped, workers, "--resume"))
    assert_same_run(straight, stopped)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Make the ``step``-th optimisation step (counted from 1) raise KeyboardInterrupt, as
    Ctrl-C in the middle of an epoch would."""
    calls: list[int] = []
    real_step = loop._step

    def step_or_interrupt(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", step_or_interrupt)
    return calls


def test_ctrl_c_mid_epoch_then_the_printed_resume_equals_the_straight_run(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    invoke(finetune_args(setup, straight, 2))
    # 12 images, batch 4: 3 steps per epoch; step 5 is the second batch of epoch 2.
    calls = interrupt_at(monkeypatch, 5)
    args = finetune_args(setup, stopped, 2)
    result = CliRunner().invoke(cli, args, obj={"argv": args})
    assert result.exit_code == 130 and calls == [1, 2, 3, 4, 5]
    message = result.output.strip().splitlines()[-1]
    assert f"interrupted in epoch 2/{EPOCHS}; kept epoch 1 in {stopped}/" in message
    assert load_training_state(stopped / CHECKPOINT_FILE)["epoch"] == 1
    monkeypatch.undo()
    command = shlex.split(message.split("continue with: ibnify ", 1)[1])
    assert command == [*args, "--resume"]
    invoke(command)
    assert_same_run(straight, stopped)


def test_python_ctrl_c_then_resume_equals_the_straight_run(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library's own path: a folder path given to ``finetune``, the model in Python."""
    options = {"epochs": EPOCHS, "batch_size": 4, "lr": 0.05, "seed": 5, "quiet": True}

    def run(out: Path, **more) -> torch.nn.Module:
        model = ibnify.load(setup["checkpoint"])
        return finetune(
            model, setup["train"], out_dir=str(out), val_data=setup["val"], **options, **more
        ).model

    straight = run(tmp_path / "a")
    interrupt_at(monkeypatch, 6)  # epoch 2, last batch
    with pytest.raises(FinetuneInterrupted) as caught:
        run(tmp_path / "b")
    assert caught.value.kept_epoch == 1
    monkeypatch.undo()
    resumed = run(tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


class _Payload:
    """Unpickling this creates a file: what a malicious training state would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_training_state_holding_an_object(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "unpickled"
    state = {"format": "ibnify.training-state/1", "epoch": 1, "model": _Payload(marker)}
    torch.save(state, out / CHECKPOINT_FILE)
    before = sorted(p.name for p in out.iterdir())
    output = invoke(finetune_args(setup, out, 0, "--resume"), exit_code=1)
    assert output.startswith(f"error: training checkpoint {str(out / CHECKPOINT_FILE)!r} is ")
    assert "corrupt or unsafe" in output and output.count("\n") == 1
    assert not marker.exists()  # the object was never built
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(CheckpointError, match="corrupt or unsafe"):
        load_training_state(out / CHECKPOINT_FILE)
    assert not marker.exists()
    # Plain data of another shape is refused too, not half-read.
    torch.save({"format": "ibnify.training-state/1", "epoch": "one"}, out / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not an ibnify training checkpoint"):
        load_training_state(out / CHECKPOINT_FILE)


def test_resume_refuses_another_worker_count_and_a_state_without_its_rng(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """The number of workers decides which process augments an image, from which seed: a
    resume with another count would not continue the same run."""
    out = tmp_path / "run"
    invoke(finetune_args(setup, out, 0, "--stop-after", "1"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    output = invoke(finetune_args(setup, out, 2, "--resume"), exit_code=1)
    assert output == (
        "error: cannot resume: options differ from the checkpoint's run (workers 0 → 2)\n"
    )
    state = load_training_state(out / CHECKPOINT_FILE)
    del state["rng"]["numpy"]
    torch.save(state, out / CHECKPOINT_FILE)
    output = invoke(finetune_args(setup, out, 0, "--resume"), exit_code=1)
    assert output == f"error: {str(out / CHECKPOINT_FILE)!r} is not an ibnify training checkpoint\n"
    assert {p.name for p in out.iterdir()} == set(before)
    assert (out / MODEL_FILE).stat().st_mtime_ns == before[MODEL_FILE]
