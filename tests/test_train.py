"""Fine-tuning: resume equality, distillation, DDP, checkpoints, schedule, CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import TensorDataset

import ibnify
import ibnify.commands.finetune as files
import ibnify.train.loop as loop
from ibnify.cli import cli
from ibnify.commands.inputs import InputRequest
from ibnify.data.images import ImageData
from ibnify.models.registry import build_model
from ibnify.train.config import FinetuneConfig, distillation_loss, parameter_groups
from ibnify.train.config import lr_factor as _lr_factor
from ibnify.train.loop import FinetuneResult, finetune
from ibnify.train.state import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, load_training_state

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {"width": 4, "image_size": 8}


def tiny_converted(seed: int = 0, width: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {**TINY, "width": width}
    model, source = build_model("ibnify:digits_resnet", **kwargs)
    return ibnify.convert(model, stages=(1, 2), arch=source, model_kwargs=kwargs)


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
    with pytest.raises(ibnify.IbnifyError, match="`resume=True`"):
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


# --- issue 21 section 5: every option reaches the library; losses by their formulas ---------

_BASE = ["finetune", "ck.safetensors", "--data", "images", "--out", "run"]
_METRICS = {
    **{"epoch": 1, "epochs": 1, "loss": 0.5, "metric": "accuracy", "acc": 0.25, "lr": 0.1},
    "seconds": 1.5,
}


def _config(field: str):
    return lambda seen: getattr(seen["config"], field)


def _arg(name: str):
    return lambda seen: seen[name]


# Every option of ``ibnify finetune``: (argv replacing or added to _BASE, what the library got,
# the value it must get). The value differs from what the baseline invocation passes.
_OPTION_TABLE = {
    "checkpoint": ([], _arg("checkpoint"), "ck.safetensors"),
    "data": (["--data", "other"], _arg("data"), "other"),
    "dataset": (["--dataset", "digits"], _arg("dataset"), "digits"),
    "val_data": (["--val-data", "val"], _arg("val_data"), "val"),
    "input_size": (["--input-size", "24"], _arg("input_size"), (3, 24, 24)),
    "skip_bad_images": (["--skip-bad-images"], _arg("skip_bad_images"), True),
    "num_classes": (["--num-classes", "7"], _arg("num_classes"), 7),
    "epochs": (["--epochs", "7"], _config("epochs"), 7),
    "lr": (["--lr", "0.123"], _config("lr"), 0.123),
    "batch_size": (["--batch-size", "9"], _config("batch_size"), 9),
    "optimizer": (["--optimizer", "adamw"], _config("optimizer"), "adamw"),
    "weight_decay": (["--weight-decay", "0.25"], _config("weight_decay"), 0.25),
    "decay_norm_and_bias": (["--no-decay-norm"], _config("decay_norm_and_bias"), False),
    "decay_in_affine": (["--no-decay-in"], _config("decay_in_affine"), False),
    "warmup_epochs": (["--warmup-epochs", "0.5"], _config("warmup_epochs"), 0.5),
    "out_dir": (["--out", "elsewhere"], _config("out_dir"), "elsewhere"),
    "resume": (["--resume"], _config("resume"), True),
    "force": (["--force"], _arg("force"), True),
    "seed": (["--seed", "11"], _config("seed"), 11),
    "distill_from": (["--distill-from", "teacher.pth"], _arg("distill_from"), "teacher.pth"),
    "distill_temperature": (["--temperature", "2.5"], _config("distill_temperature"), 2.5),
    "workers": (["--workers", "3"], _config("workers"), 3),
    "stop_after": (["--stop-after", "2"], _config("stop_after"), 2),
    "quiet": (["--quiet"], lambda seen: (seen["config"].quiet, seen["output"]), (True, "")),
    "as_json": (["--json"], _arg("output"), json.dumps(_METRICS)),
    "threads": (["--threads", "2"], _arg("threads"), 2),
}


def _invoke_finetune(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> dict:
    """Run ``ibnify finetune`` with ``finetune_files`` replaced by a recorder."""
    seen: dict = {}

    def recorder(run, config, on_epoch):
        inputs = run.inputs
        given = {k: getattr(run, k) for k in ("val_data", "distill_from", "num_classes", "force")}
        seen.update(given, data=inputs.data, dataset=inputs.dataset, input_size=inputs.input_size)
        seen.update(skip_bad_images=inputs.skip_bad_images)
        seen.update(checkpoint=run.checkpoint, config=config, threads=torch.get_num_threads())
        on_epoch(dict(_METRICS))
        return FinetuneResult(torch.nn.Identity())

    monkeypatch.setattr(files, "finetune_files", recorder)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    seen["output"] = result.output.split("finished: wrote")[0].strip()
    return seen


def _with(option_args: list[str]) -> list[str]:
    args = list(_BASE)
    if option_args[:1] == ["--dataset"]:
        del args[2:4]  # --data and --dataset exclude each other
    return args + option_args


def test_the_option_table_covers_every_finetune_option() -> None:
    from ibnify.cli.training import finetune_command

    assert {p.name for p in finetune_command.params} == set(_OPTION_TABLE)


@pytest.mark.parametrize("name", sorted(_OPTION_TABLE))
def test_every_finetune_option_reaches_the_library(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    option_args, read, expected = _OPTION_TABLE[name]
    baseline = _invoke_finetune(monkeypatch, _BASE)
    seen = _invoke_finetune(monkeypatch, _with(option_args))
    assert read(seen) == expected
    if option_args:
        assert read(baseline) != expected  # the option changed what the library got


def test_finetune_files_hands_every_argument_to_finetune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer below the CLI: data, validation, input size, head, teacher, force, on_epoch."""
    for split, count in (("train", 3), ("val", 2)):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (30, 30), (10 * i, 90, 200)).save(
                    tmp_path / split / label / f"{i}.png"
                )
    torch.manual_seed(0)
    model, source = build_model("ibnify:digits_resnet", **TINY)
    ckpt = tmp_path / "ibn.safetensors"
    ibnify.save(ibnify.convert(model, stages=(1,), arch=source, model_kwargs=TINY), ckpt)
    torch.save(model.state_dict(), tmp_path / "teacher.pth")
    seen: dict = {}

    def recorder(student, train_data, config, **kwargs):
        seen.update(kwargs, student=student, train=train_data, config=config)

    monkeypatch.setattr(files, "finetune", recorder)
    config = FinetuneConfig(out_dir=str(tmp_path / "run"), seed=4)

    def on_epoch(metrics: dict) -> None:
        return None

    inputs = InputRequest(data=tmp_path / "train", input_size=(3, 12, 12))
    run = files.FinetuneFiles(ckpt, inputs, val_data=tmp_path / "val", num_classes=2, force=True)
    files.finetune_files(run, config, on_epoch)
    assert seen["config"] is config and seen["force"] is True and seen["on_epoch"] is on_epoch
    assert seen["student"].fc.out_features == 2 and seen["teacher"] is None
    assert len(seen["train"]) == 6 and seen["train"].num_classes == 2
    assert seen["train"].dataset[0][0].shape == (3, 12, 12)
    assert len(seen["val_data"]) == 4 and seen["val_data"].dataset[0][0].shape == (3, 12, 12)
    # A teacher (the student's classes: no --num-classes), at the recorded input size (8).
    teacher = str(tmp_path / "teacher.pth")
    inputs = InputRequest(data=tmp_path / "train")
    files.finetune_files(files.FinetuneFiles(ckpt, inputs, distill_from=teacher), config)
    assert seen["force"] is False and seen["val_data"] is None
    assert seen["train"].dataset[0][0].shape == (3, 8, 8)
    teacher_state = seen["teacher"].state_dict()
    assert all(torch.equal(teacher_state[k], v) for k, v in model.state_dict().items())


def _spy(monkeypatch: pytest.MonkeyPatch, name: str, store: list) -> None:
    """Wrap ``ibnify.train.loop.<name>`` so that each call's result lands in ``store``."""
    real = getattr(loop, name)

    def spy(*args, **kwargs):
        store.append((args, kwargs, result := real(*args, **kwargs)))
        return result

    monkeypatch.setattr(loop, name, spy)


def _every_field_changed() -> FinetuneConfig:
    """A config with a non-default value in every field the loop reads."""
    return FinetuneConfig(
        epochs=4,
        lr=0.2,
        batch_size=12,
        optimizer="sgd",
        momentum=0.7,
        weight_decay=0.03,
        decay_norm_and_bias=False,
        decay_in_affine=False,
        warmup_epochs=2,
        min_lr=0.01,
        distill_temperature=2.5,
        seed=6,
        workers=1,
        stop_after=3,
        quiet=True,
        device="cpu",
        channels_last=True,
        amp=False,
    )


def test_every_config_field_reaches_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """One run with a non-default value in every field; each is read where it acts."""
    optimizers: list = []
    loaders: list = []
    losses: list = []
    steps: list = []
    for name, store in (
        ("make_optimizer", optimizers),
        ("_epoch_loader", loaders),
        ("distillation_loss", losses),
        ("_step", steps),
    ):
        _spy(monkeypatch, name, store)
    config = _every_field_changed()
    # Width 8, not 4: oneDNN's AVX2 1x1 stride-2 backward-weights kernel in channels_last
    # writes out of bounds when a conv has fewer than 8 input channels (uxlfoundation/oneDNN
    # #6035: a crash at 1 thread, wrong weight gradients at more), which CI's AVX2 run hits.
    model = tiny_converted(width=8)
    result = finetune(model, tiny_data(n=48), config, teacher=tiny_converted(seed=1, width=8))
    optimizer = optimizers[0][2]
    no_decay = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    checks = {
        "epochs": result.history[0]["epochs"] == 4,
        "stop_after": len(result.history) == 3 and not result.completed,
        "lr": optimizer.param_groups[0]["initial_lr"] == 0.2,
        "momentum": optimizer.defaults["momentum"] == 0.7,
        "weight_decay": optimizer.param_groups[0]["weight_decay"] == 0.03,
        "decay_in_affine": id(model.layer1[0].bn1.IN.weight) in no_decay,
        "decay_norm_and_bias": id(model.layer1[0].bn2.weight) in no_decay,
        # 4 steps per epoch, 8 of warmup: half the peak after epoch 1 ((4 + 1) / 8), the peak
        # after epoch 2, then halfway down the cosine to min_lr after epoch 3.
        "warmup_epochs": result.history[0]["lr"] == pytest.approx(0.2 * 5 / 8)
        and result.history[1]["lr"] == pytest.approx(0.2),
        "min_lr": result.history[2]["lr"] == pytest.approx(0.01 + 0.19 * 0.5),
        "batch_size": [loader.batch_size for _, _, loader in loaders] == [12] * 3,
        "workers": all(loader.num_workers == 1 for _, _, loader in loaders),
        "seed": [loader.sampler.generator.initial_seed() for *_, loader in loaders]
        == [6000, 6001, 6002],
        "distill_temperature": {args[2] for args, _, _ in losses} == {2.5},
        "channels_last": steps[0][0][3].is_contiguous(memory_format=torch.channels_last),
        "device": steps[0][0][3].device.type == "cpu",
    }
    assert {name for name, ok in checks.items() if not ok} == set()
    assert len(losses) == len(steps) == 12
    adamw = finetune(
        tiny_converted(), tiny_data(n=16), epochs=1, batch_size=16, quiet=True, optimizer="adamw"
    )
    assert adamw.completed and type(optimizers[-1][2]) is torch.optim.AdamW
    assert type(optimizer) is torch.optim.SGD


def test_distillation_loss_equals_its_formula_on_a_hand_computed_case() -> None:
    """T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T)), with numbers worked by hand."""
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, 0.0]])
    # T = 1, row 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2); row 2: identical logits, KL 0.
    row1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(distillation_loss(student, teacher, 1.0)) == pytest.approx(row1 / 2, abs=1e-7)
    # T = 2: p_t = (√3, 1) / (√3 + 1), p_s = (1/2, 1/2); times T² = 4.
    high = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    row1 = high * math.log(high / 0.5) + (1 - high) * math.log((1 - high) / 0.5)
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(4 * row1 / 2, abs=1e-7)


class _Linear(torch.nn.Module):
    """Logits = W · flatten(x) + b, with fixed non-trivial values: no BN, no randomness."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 2 * 2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-1, 1, 36).view(3, 12) * scale)
            self.fc.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _hand_logits(model: torch.nn.Module, images: torch.Tensor) -> list[list[float]]:
    weight, bias = model.fc.weight.tolist(), model.fc.bias.tolist()
    rows = [((image - 0.5) / 0.25).flatten().tolist() for image in images]
    pairs = list(zip(weight, bias, strict=True))
    return [
        [sum(w * x for w, x in zip(ws, row, strict=True)) + b for ws, b in pairs] for row in rows
    ]


def _log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [v / temperature for v in row]
    total = math.log(sum(math.exp(v) for v in scaled))
    return [v - total for v in scaled]


def test_the_loop_records_cross_entropy_and_accuracy_by_their_formulas() -> None:
    """One step over 4 images: the epoch's loss is the mean of −log softmax(logits)[label] of
    the model before the step, its accuracy the share of argmax == label."""
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(4, 3, 2, 2, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    data = ImageData(TensorDataset(images, labels), (0.5,) * 3, (0.25,) * 3, 3, True, "hand")
    model = _Linear(scale=1.0)
    logits = _hand_logits(model, images)
    loss = sum(-_log_softmax(row)[y] for row, y in zip(logits, labels.tolist(), strict=True)) / 4
    correct = sum(
        max(range(3), key=row.__getitem__) == y
        for row, y in zip(logits, labels.tolist(), strict=True)
    )
    result = finetune(
        model, data, epochs=1, batch_size=4, lr=0.1, quiet=True, small_batch_warning=0
    )
    assert result.history[0]["loss"] == pytest.approx(loss, abs=1e-6)
    assert result.history[0]["acc"] == correct / 4 and 0 < correct < 4


def test_the_loop_records_the_distillation_loss_at_the_configured_temperature() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 2, 2, generator=generator)
    data = ImageData(
        TensorDataset(images, torch.full((4,), -1)), (0.5,) * 3, (0.25,) * 3, None, False, "hand"
    )
    student, teacher = _Linear(scale=1.0), _Linear(scale=-0.5)
    kl = 0.0
    for s_row, t_row in zip(
        _hand_logits(student, images), _hand_logits(teacher, images), strict=True
    ):
        log_s, log_t = _log_softmax(s_row, 3.0), _log_softmax(t_row, 3.0)
        kl += sum(math.exp(t) * (t - s) for s, t in zip(log_s, log_t, strict=True))
    result = finetune(
        student,
        data,
        teacher=teacher,
        epochs=1,
        batch_size=4,
        lr=0.1,
        quiet=True,
        distill_temperature=3.0,
        small_batch_warning=0,
    )
    assert result.history[0]["loss"] == pytest.approx(9.0 * kl / 4, abs=1e-6)
    assert result.history[0]["metric"] == "teacher_agreement"


def test_finetune_hands_the_student_back_in_the_modes_it_came_in() -> None:
    """Every submodule's own flag, also when the run raises; requires_grad untouched."""
    model = tiny_converted()
    model.train()
    model.layer1.eval()  # a block the caller froze in eval mode
    model.conv1.weight.requires_grad_(False)
    before = [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]
    finetune(model, tiny_data(n=32), epochs=1, batch_size=16, quiet=True)
    assert (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    ) == before

    def boom(metrics: dict) -> None:
        raise RuntimeError("stop")

    model.eval()
    with pytest.raises(RuntimeError, match="stop"):
        finetune(
            model,
            tiny_data(n=32),
            epochs=1,
            batch_size=16,
            quiet=True,
            on_epoch=boom,
            val_data=tiny_data(n=16),
        )
    assert not any(m.training for m in model.modules())


def test_a_fresh_head_is_drawn_from_the_run_seed_not_the_callers_rng() -> None:
    heads = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = tiny_converted()
        torch.manual_seed(global_seed + 10)
        finetune(
            model,
            tiny_data(n=16),
            epochs=1,
            batch_size=16,
            quiet=True,
            num_classes=10,
            lr=1e-9,
            seed=7,
        )
        heads.append(model.fc.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


class _Report:
    """What ``ibnify evaluate`` prints from: a recorded stand-in for RobustnessReport."""

    dataset, images, domain_images = "images", 4, {"night": 2}

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def plot(self, path: Path) -> Path:
        self.seen["plot"] = str(path)
        return Path(path)

    def to_json(self) -> str:
        return '{"json": true}'

    def table(self) -> str:
        return "TABLE"


_EVALUATE_BASE = ["evaluate", "a.safetensors", "--data", "images"]
# Every option of ``ibnify evaluate``, as for finetune above.
_EVALUATE_TABLE = {
    "checkpoints": (["b.safetensors"], _arg("checkpoints"), ("a.safetensors", "b.safetensors")),
    "data": (["--data", "other"], _arg("data"), "other"),
    "dataset": (["--dataset", "digits"], _arg("dataset"), "digits"),
    "domains": (
        ["--domain", "night=n", "--domain", "fog=f"],
        _arg("domains"),
        ("night=n", "fog=f"),
    ),
    "shifts": (["--shift", "gamma,blur"], _arg("shifts"), "gamma,blur"),
    "input_size": (["--input-size", "3,20,24"], _arg("input_size"), (3, 20, 24)),
    "skip_bad_images": (["--skip-bad-images"], _arg("skip_bad_images"), True),
    "plot": (["--plot", "PLOT.png"], lambda seen: seen.get("plot", "").endswith("PLOT.png"), True),
    "as_json": (["--json"], _arg("output"), '{"json": true}'),
    "batch_size": (["--batch-size", "7"], _arg("batch_size"), 7),
    "workers": (["--workers", "2"], _arg("workers"), 2),
    "seed": (["--seed", "9"], _arg("seed"), 9),
    "force": (["--plot", "PLOT.png", "--force"], lambda seen: seen.get("plot", ""), "PLOT.png"),
    "threads": (["--threads", "2"], _arg("threads"), 2),
}


def _invoke_evaluate(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> dict:
    import ibnify.commands.evaluate as evaluation

    seen: dict = {}

    def recorder(run):
        plot = run.check()  # the plot path's check (exists without --force) is the record's
        fields = ("domains", "batch_size", "seed", "workers")
        seen.update({k: getattr(run, k) for k in fields}, shifts=run.chosen_shifts)
        inputs = run.inputs
        seen.update(data=inputs.data, dataset=inputs.dataset, input_size=inputs.input_size)
        seen.update(skip_bad_images=inputs.skip_bad_images)
        seen.update(checkpoints=tuple(run.checkpoints), threads=torch.get_num_threads())
        report = _Report(seen)
        if plot is not None:
            report.plot(plot)
        return report

    monkeypatch.setattr(evaluation, "evaluate_files", recorder)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    seen["output"] = result.output.strip()
    return seen


def test_the_evaluate_option_table_covers_every_option() -> None:
    from ibnify.cli.training import evaluate_command

    assert {p.name for p in evaluate_command.params} == set(_EVALUATE_TABLE)


@pytest.mark.parametrize("name", sorted(_EVALUATE_TABLE))
def test_every_evaluate_option_reaches_the_library(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    option_args, read, expected = _EVALUATE_TABLE[name]
    base = list(_EVALUATE_BASE)
    if option_args[:1] == ["--dataset"]:
        del base[2:4]
    if name == "force":
        (tmp_path / "PLOT.png").write_bytes(b"old")  # refused without --force
    baseline = _invoke_evaluate(monkeypatch, _EVALUATE_BASE)
    seen = _invoke_evaluate(monkeypatch, base + option_args)
    assert read(seen) == expected
    assert read(baseline) != expected


def test_each_epoch_starts_one_set_of_loader_workers_and_ctrl_c_stops_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``workers`` processes per epoch, not two sets (tqdm.auto given the loader starts an
    iterator of its own); after Ctrl-C, with the exception still held, none is left running."""
    import multiprocessing
    import multiprocessing.process

    from ibnify.train.progress import FinetuneInterrupted

    started: list[int] = []
    real_start = multiprocessing.process.BaseProcess.start

    def counting_start(self) -> None:
        started.append(1)
        real_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counting_start)
    finetune(tiny_converted(), tiny_data(n=32), epochs=2, batch_size=16, workers=2, quiet=True)
    assert len(started) == 2 * 2
    calls: list[int] = []
    real_step = loop._step

    def step_or_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", step_or_interrupt)
    with pytest.raises(FinetuneInterrupted) as caught:
        finetune(tiny_converted(), tiny_data(n=64), epochs=2, batch_size=16, workers=2, quiet=True)
    assert caught.value.kept_epoch == 0 and multiprocessing.active_children() == []
