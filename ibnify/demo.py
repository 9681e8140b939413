"""The end-to-end demo: what IBN buys on real data, in about a minute on a laptop CPU.

On scikit-learn's 1,797 real handwritten digits (rendered as 16×16 3-channel images) it trains a
small ResNet-style baseline, converts it with ibnify (IBN-a in stages 1-2, weights transferred),
fine-tunes it, fine-tunes an identical copy of the baseline for the same steps as a control,
evaluates both under appearance shifts, exports the IBN model to ONNX and verifies it, and
prints the table and writes the plot. Everything is seeded: the same seed gives the same table.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_write_bytes, check_output_dir, check_output_path, output_lock
from .api import convert
from .core.surgery import get_plan
from .data.digits import digits_data
from .data.images import ImageData, Normalize
from .deploy.export import export_onnx
from .deploy.ort import open_session
from .deploy.verify import verify_onnx
from .evaluation import RobustnessReport, evaluate
from .models.checkpoint import save
from .models.registry import build_model
from .train.config import FinetuneConfig
from .train.loop import finetune

__all__ = ["DemoConfig", "DemoResult", "demo_outputs", "platform", "platform_line", "run_demo"]

logger = logging.getLogger(__name__)

SOURCE = "ibnify:digits_resnet"
# The shifts the demo's claim is about: darkening and low contrast.
KEY_SHIFTS = ("brightness_down", "contrast_down", "gamma")


@dataclass
class DemoConfig:
    """Demo sizes; the defaults are the README's run, ``quick()`` a smoke-test version."""

    seed: int = 0
    baseline_epochs: int = 12
    finetune_epochs: int = 5
    baseline_lr: float = 0.1
    finetune_lr: float = 0.02
    batch_size: int = 64
    weight_decay: float = 5e-4
    stages: tuple[int, ...] = (1, 2)
    ratio: float = 0.5
    export: bool = True
    # Small convolutions run fastest on one thread; more threads mostly wait on each other,
    # and on a busy machine far more so.
    threads: int = 1

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A reduced run for tests: fewer epochs, same pipeline."""
        return cls(seed=seed, baseline_epochs=6, finetune_epochs=2)


@dataclass
class DemoResult:
    """The demo's report (baseline, control, IBN columns) and what it wrote."""

    report: RobustnessReport
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The printed result: table, the key comparison in words, ONNX check, files."""
        report = self.report
        lines = [report.table(), ""]
        clean_gap = 100 * (report.accuracy["ibn"]["clean"] - report.accuracy["control"]["clean"])
        lines.append(f"clean accuracy, IBN minus control: {clean_gap:+.1f} points")
        for shift in KEY_SHIFTS:
            if shift in report.shifts:
                lines.append(
                    f"{shift}: drop {100 * report.drop('control', shift):.1f} points (control) "
                    f"vs {100 * report.drop('ibn', shift):.1f} (IBN)"
                )
        if self.onnx:
            lines.append(self.onnx["line"])
        platform = report.extras.get("demo", {}).get("platform")
        if platform:
            lines.append(platform_line(platform))
        for label, path in self.files.items():
            lines.append(f"wrote {label}: {path}")
        lines.append(f"demo finished in {self.seconds:.0f} s")
        return "\n".join(lines)


def platform() -> dict[str, Any]:
    """What a seeded run's last digits depend on: torch's version and build, the CPU kernels
    ATen dispatches to (``ATEN_CPU_CAPABILITY`` lowers it), and the thread count."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def platform_line(record: dict[str, Any]) -> str:
    """The line the demo prints under its table: what produced these figures."""
    threads = record.get("threads")
    return (
        f"ran with torch {record.get('torch')}, CPU capability {record.get('cpu_capability')}, "
        f"{threads} thread{'s' if threads != 1 else ''}; another CPU or torch build prints "
        "other figures (docs/demo.md shows their spread)"
    )


def demo_outputs(out_dir: str | Path, export: bool = True) -> dict[str, Path]:
    """The files the demo writes into ``out_dir``."""
    out = Path(out_dir)
    files = {
        "plot": out / "robustness.png",
        "report": out / "robustness.json",
        "baseline": out / "baseline.safetensors",
        "control": out / "control.safetensors",
        "ibn": out / "ibn.safetensors",
    }
    if export:
        files["onnx"] = out / "ibn.onnx"
    return files


def run_demo(
    out_dir: str | Path = "ibnify-demo",
    config: DemoConfig | None = None,
    force: bool = False,
    quiet: bool = True,
    echo: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo and write its files into ``out_dir`` (created if missing).

    Args:
        out_dir: output folder for the plot, JSON report, checkpoints and ONNX file.
        config: sizes and seed; default :class:`DemoConfig`.
        force: overwrite existing output files.
        quiet: hide the per-epoch progress bars.
        echo: called with one line per step (the CLI passes ``click.echo``).
    """
    config = config or DemoConfig()
    say = echo or logger.info
    out = check_output_dir(out_dir)
    with output_lock(out):  # a second demo writing this folder is refused while this one runs
        files = demo_outputs(out, export=config.export)
        for path in files.values():
            check_output_path(path, force=force)
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            return _run(config, files, quiet, say)
        finally:
            torch.set_num_threads(threads)


def _run(
    config: DemoConfig,
    files: dict[str, Path],
    quiet: bool,
    say: Callable[[str], None],
) -> DemoResult:
    """Train the baseline, convert, fine-tune IBN and control alike, evaluate, export, save."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    train_data = digits_data("train", seed=config.seed)
    test_data = digits_data("test", seed=config.seed)
    say(
        f"digits: {len(train_data)} training and {len(test_data)} test images, 3×16×16 "
        f"(scikit-learn load_digits); seed {config.seed}"
    )
    models = _train_models(config, train_data, quiet, say)
    report = evaluate(models, test_data, shifts="all")
    report.extras["demo"] = {
        "seed": config.seed,
        "baseline_epochs": config.baseline_epochs,
        "finetune_epochs": config.finetune_epochs,
        "stages": list(config.stages),
        "ratio": config.ratio,
        "platform": platform(),
    }
    say("4. evaluated on the test split, clean and under each appearance shift")

    onnx: dict[str, Any] = {}
    if config.export:
        onnx = _export_and_verify(models["ibn"], files["onnx"], test_data)
        say(f"5. exported the IBN model to {files['onnx'].name} and verified it in onnxruntime")
    report.plot(files["plot"], title="digits: accuracy under appearance shift")
    atomic_write_bytes(files["report"], (report.to_json() + "\n").encode())
    # The baseline and the control are never converted: saved with no plan, they load as built.
    save(models["baseline"], files["baseline"], source=SOURCE)
    save(models["control"], files["control"], source=SOURCE)
    save(models["ibn"], files["ibn"])
    return DemoResult(report, time.perf_counter() - started, files, onnx)


def _train_models(
    config: DemoConfig, train_data: ImageData, quiet: bool, say: Callable[[str], None]
) -> dict[str, nn.Module]:
    """Steps 1-3: the trained BN baseline, its IBN conversion and an all-BN copy (the
    control), both fine-tuned alike; ``{"baseline", "control", "ibn"}`` (the table's columns)."""
    baseline, _ = build_model(SOURCE)
    base_config = _finetune_config(config, config.baseline_epochs, config.baseline_lr, 0, quiet)
    step = time.perf_counter()
    finetune(baseline, train_data, base_config)
    seconds = time.perf_counter() - step
    say(f"1. trained the BN baseline: {config.baseline_epochs} epochs in {seconds:.0f} s")

    ibn = convert(baseline, layout="a", stages=config.stages, ratio=config.ratio, arch=SOURCE)
    plan = get_plan(ibn)
    sites = ", ".join(site.name for site in plan.sites) if plan else ""
    say(f"2. converted with ibnify: IBN-a in stages {config.stages}, sites {sites}")
    control = copy.deepcopy(baseline)
    tune = _finetune_config(config, config.finetune_epochs, config.finetune_lr, 1, quiet)
    step = time.perf_counter()
    finetune(ibn, train_data, tune)
    finetune(control, train_data, tune)
    say(
        f"3. fine-tuned the IBN model and an identical copy of the baseline (control) for the "
        f"same {config.finetune_epochs} epochs in {time.perf_counter() - step:.0f} s"
    )
    return {"baseline": baseline, "control": control, "ibn": ibn}


def _finetune_config(
    config: DemoConfig, epochs: int, lr: float, seed_offset: int, quiet: bool
) -> FinetuneConfig:
    """The demo's fine-tuning settings on CPU; the seed offset keeps baseline and tune apart."""
    return FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        seed=config.seed + seed_offset,
        quiet=quiet,
        device="cpu",
    )


def _export_and_verify(model: nn.Module, path: Path, test_data: ImageData) -> dict[str, Any]:
    """Export with ``ibnify.export_onnx`` and verify against PyTorch on random and real digits."""
    export_onnx(model, path, input_size=(3, 16, 16))
    verification = verify_onnx(path, model, batch_sizes=(1, 8))
    images = torch.stack([test_data.dataset[i][0] for i in range(len(test_data))])
    inputs = Normalize(test_data.mean, test_data.std)(images)
    session = open_session(path)
    name = session.get_inputs()[0].name
    ort_logits = session.run(None, {name: inputs.numpy().astype(np.float32)})[0]
    model.eval()
    with torch.no_grad():
        torch_logits = model(inputs).numpy()
    agree = int((ort_logits.argmax(1) == torch_logits.argmax(1)).sum())
    max_abs = float(np.abs(ort_logits - torch_logits).max())
    line = (
        f"exported {path.name} and verified it in onnxruntime: random inputs max abs error "
        f"{verification.max_abs:.2g} ({'PASS' if verification.passed else 'FAIL'}); "
        f"{agree}/{len(images)} real test digits give the same class (max abs {max_abs:.2g})"
    )
    return {
        "line": line,
        "passed": bool(verification.passed) and agree == len(images),
        "max_abs_random": verification.max_abs,
        "max_abs_digits": max_abs,
        "agree": agree,
        "images": len(images),
    }
