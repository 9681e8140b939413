"""Fine-tuning: resume equality, distillation, DDP, checkpoints, schedule, CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

import ibnify
from ibnify.cli import cli
from ibnify.data.images import ImageData
from ibnify.models.registry import build_model
from ibnify.train.config import FinetuneConfig, distillation_loss, parameter_groups
from ibnify.train.config import lr_factor as _lr_factor
from ibnify.train.loop import finetune
from ibnify.train.state import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, load_training_state

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {"width": 4, "image_size": 8}


def tiny_converted(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, source = build_model("ibnify:digits_resnet", **TINY)
    return ibnify.convert(model, stages=(1, 2), arch=source, model_kwargs=TINY)


def tiny_data(n: int = 96, labelled: bool = True, seed: int = 0) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator) if labelled else torch.full((n,), -1)
    return ImageData(TensorDataset(images, labels), (0.5,) * 3, (0.25,) * 3, 10, labelled, "tiny")


def test_two_epochs_equal_one_plus_resume_plus_one_bit_for_bit(tmp_path: Path) -> None:
    data = tiny_data()
    config = FinetuneConfig(epochs=2, lr=0.05, batch_size=16, quiet=True, seed=3)
    straight = finetune(tiny_converted(), data, config, out_dir=str(tmp_path / "a")).model
    first = finetune(tiny_converted(), data, config, out_dir=str(tmp_path / "b"), stop_after=1)
    assert not first.completed and len(first.history) == 1
    resumed = finetune(tiny_converted(), data, config, out_dir=str(tmp_path / "b"), resume=True)
    assert resumed.completed
    a, b = straight.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The run really trained: weights moved away from the initial ones.
    assert not torch.equal(a["fc.weight"], tiny_converted().state_dict()["fc.weight"])
    lines = (tmp_path / "b" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_checkpoint_is_plain_data_and_reloads_as_ibnify_model(tmp_path: Path) -> None:
    finetune(
        tiny_converted(), tiny_data(), epochs=1, batch_size=32, quiet=True, out_dir=str(tmp_path)
    )
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng"} <= set(state)
    assert state["epoch"] == 1
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    model = ibnify.load(tmp_path / MODEL_FILE)
    assert torch.equal(model.state_dict()["fc.weight"], state["model"]["fc.weight"])
    assert type(model.layer1[0].bn1).__name__ == "IBN"


def test_resume_refuses_changed_options_and_fresh_run_refuses_existing_dir(tmp_path: Path) -> None:
    data = tiny_data()
    finetune(
        tiny_converted(),
        data,
        epochs=2,
        batch_size=32,
        quiet=True,
        out_dir=str(tmp_path),
        stop_after=1,
    )
    with pytest.raises(ibnify.IbnifyError, match="epochs 2"):
        finetune(
            tiny_converted(),
            data,
            epochs=3,
            batch_size=32,
            quiet=True,
            out_dir=str(tmp_path),
            resume=True,
        )
    with pytest.raises(ibnify.IbnifyError, match="--resume"):
        finetune(tiny_converted(), data, epochs=2, batch_size=32, quiet=True, out_dir=str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ibnify.IbnifyError, match="corrupt"):
        load_training_state(bad / CHECKPOINT_FILE)


def test_distillation_improves_agreement_with_the_teacher_without_labels() -> None:
    data = tiny_data(n=192, labelled=False, seed=1)
    teacher = tiny_converted(seed=1).eval()
    student = tiny_converted(seed=2)
    images = data.dataset.tensors[0]
    inputs = (images - 0.5) / 0.25

    def agreement() -> float:
        student.eval()
        with torch.no_grad():
            return float((student(inputs).argmax(1) == teacher(inputs).argmax(1)).float().mean())

    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = agreement()
    result = finetune(
        student,
        data,
        teacher=teacher,
        epochs=6,
        lr=3e-3,
        optimizer="adamw",
        batch_size=32,
        quiet=True,
        warmup_epochs=0,
    )
    after = agreement()
    assert result.history[-1]["metric"] == "teacher_agreement"
    assert after > before + 0.2 and after > 0.6, (before, after)
    # The teacher is frozen: in eval mode and unchanged.
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_unlabelled_data_without_teacher_is_refused() -> None:
    with pytest.raises(ibnify.IbnifyError, match="no labels"):
        finetune(tiny_converted(), tiny_data(labelled=False), epochs=1, quiet=True)


def test_distillation_loss_is_zero_for_identical_logits_and_grows_with_difference() -> None:
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits, 4.0).abs() < 1e-6
    near = distillation_loss(logits + 0.1 * torch.randn(8, 10), logits, 4.0)
    far = distillation_loss(torch.randn(8, 10) * 5, logits, 4.0)
    assert 0 < near < far


def test_cosine_schedule_with_warmup() -> None:
    factors = [_lr_factor(step, 10, 100, 0.0) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(factors[:10]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert _lr_factor(100, 10, 100, 0.0) == pytest.approx(0.0)
    assert _lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_weight_decay_groups_make_in_affine_an_explicit_choice() -> None:
    model = tiny_converted()
    in_weight = model.layer1[0].bn1.IN.weight
    bn_weight = model.layer1[0].bn2.weight
    conv_weight = model.layer1[0].conv1.weight

    def decayed(config: FinetuneConfig) -> set[int]:
        groups = parameter_groups(model, config)
        return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    reference = decayed(FinetuneConfig())
    assert {id(in_weight), id(bn_weight), id(conv_weight)} <= reference
    no_in = decayed(FinetuneConfig(decay_in_affine=False))
    assert id(in_weight) not in no_in and id(bn_weight) in no_in
    timm_style = decayed(FinetuneConfig(decay_norm_and_bias=False))
    assert id(in_weight) in timm_style and id(bn_weight) not in timm_style
    assert id(conv_weight) in timm_style


_DDP_WORKER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import ibnify
from torch.utils.data import TensorDataset
from ibnify.data.images import ImageData
from ibnify.models.registry import build_model
from ibnify.train.loop import finetune

torch.set_num_threads(1)
torch.manual_seed(int(os.environ["RANK"]))  # different init per rank: DDP must sync it
model, source = build_model("ibnify:digits_resnet", width=4, image_size=8)
model = ibnify.convert(model, stages=(1, 2), arch=source, model_kwargs=dict(width=4, image_size=8))
g = torch.Generator().manual_seed(0)
data = ImageData(TensorDataset(torch.rand(64, 3, 8, 8, generator=g),
                               torch.randint(0, 10, (64,), generator=g)), (0.5,) * 3, (0.25,) * 3)
result = finetune(model, data, epochs=2, batch_size=8, lr=0.05, quiet=True,
                  out_dir=sys.argv[1], device="cpu")
torch.save(result.model.state_dict(), os.path.join(sys.argv[1], f"rank{{os.environ['RANK']}}.pt"))
"""


def test_ddp_two_cpu_processes_finish_with_identical_weights(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_DDP_WORKER.format(root=root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    done = subprocess.run(
        [*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Each rank saw half the data: 64 images / 2 ranks / batch 8 = 4 steps per epoch.
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["config"]["world_size"] == 2 and state["scheduler"]["last_epoch"] == 8
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])["images"] == 64


def test_cli_finetune_digits_then_refuses_to_overwrite(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "ibn.safetensors"
    model, source = build_model("ibnify:digits_resnet", width=8)
    ibnify.save(ibnify.convert(model, stages=(1, 2), arch=source, model_kwargs={"width": 8}), ckpt)
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["finetune", str(ckpt), "--dataset", "digits", "--epochs", "1", "--out", str(out)]
    result = runner.invoke(cli, [*args, "--batch-size", "128", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(next(t for t in result.output.splitlines() if t.startswith("{")))
    assert line["epoch"] == 1 and 0.0 <= line["val_acc"] <= 1.0
    assert "wrote" in result.output
    assert ibnify.load(out / MODEL_FILE).layer1[0].bn1.IN.weight.shape == (4,)
    again = runner.invoke(cli, [*args, "--quiet"])
    assert again.exit_code == 1
    assert again.output.strip().startswith("error:") and "--resume" in again.output
    neither = runner.invoke(cli, ["finetune", str(ckpt), "--out", str(out)])
    assert neither.exit_code == 2 and "--dataset digits" in neither.output


def test_cli_finetune_image_folder_and_label_free_folder(tmp_path: Path) -> None:
    from PIL import Image

    torch.manual_seed(0)
    folder = tmp_path / "images"
    flat = tmp_path / "flat"
    flat.mkdir()
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
            Image.fromarray(pixels).save(flat / f"{label}{i}.png")
    model, source = build_model("ibnify:digits_resnet", width=4, num_classes=2)
    kwargs = {"width": 4, "num_classes": 2}
    teacher = tmp_path / "teacher.safetensors"
    torch.save(model.state_dict(), tmp_path / "teacher.pth")
    ckpt = tmp_path / "ibn.safetensors"
    ibnify.save(ibnify.convert(model, stages=(1,), arch=source, model_kwargs=kwargs), ckpt)
    runner = CliRunner()
    base = ["finetune", str(ckpt), "--epochs", "1", "--batch-size", "4", "--quiet"]
    labelled = runner.invoke(cli, [*base, "--data", str(folder), "--out", str(tmp_path / "o1")])
    assert labelled.exit_code == 0, labelled.output
    no_labels = runner.invoke(cli, [*base, "--data", str(flat), "--out", str(tmp_path / "o2")])
    assert no_labels.exit_code == 1 and "--distill-from" in no_labels.output
    distilled = runner.invoke(
        cli,
        [
            *base,
            "--data",
            str(flat),
            "--out",
            str(tmp_path / "o3"),
            "--distill-from",
            str(tmp_path / "teacher.pth"),
        ],
    )
    assert distilled.exit_code == 0, distilled.output
    state = torch.load(tmp_path / "o3" / CHECKPOINT_FILE, weights_only=True)
    assert state["history"][0]["metric"] == "teacher_agreement"
    assert not teacher.exists()


def test_small_per_process_batch_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ibnify.train"):
        finetune(tiny_converted(), tiny_data(n=32), epochs=1, batch_size=8, quiet=True)
    assert any("batch size 8 per process is small" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ibnify.train"):
        finetune(tiny_converted(), tiny_data(n=32), epochs=1, batch_size=16, quiet=True)
    assert not caplog.records
