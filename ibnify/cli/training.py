"""``ibnify finetune``, ``ibnify evaluate`` and ``ibnify demo``: training and measuring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..constants import FINETUNE_DEFAULTS, OPTIMIZERS
from ._group import (
    Interrupted,
    _data_options,
    _one_data_source,
    cli,
    image_size_option,
    invocation,
    skip_bad_images_option,
    threads_option,
)

__all__ = ["demo_command", "evaluate_command", "finetune_command"]

_DEFAULTS = FINETUNE_DEFAULTS


@cli.command("finetune")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_data_options
@click.option("--val-data", type=click.Path(file_okay=False), help="Labelled validation folder.")
@skip_bad_images_option
@image_size_option()
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    help="Give the model a fresh classifier head of N classes first (its own data's count).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=_DEFAULTS["epochs"], show_default=True
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS["lr"],
    show_default=True,
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_DEFAULTS["batch_size"],
    show_default=True,
    help="Images per process and step.",
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=_DEFAULTS["optimizer"],
    show_default=True,
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    default=_DEFAULTS["weight_decay"],
    show_default=True,
)
@click.option(
    "--decay-norm/--no-decay-norm",
    "decay_norm_and_bias",
    default=_DEFAULTS["decay_norm_and_bias"],
    show_default=True,
    help="Weight decay on BN affine and biases (reference recipe: yes; timm: no).",
)
@click.option(
    "--decay-in/--no-decay-in",
    "decay_in_affine",
    default=_DEFAULTS["decay_in_affine"],
    show_default=True,
    help="Weight decay on the InstanceNorm affine of the IBN layers.",
)
@click.option(
    "--warmup-epochs",
    type=click.FloatRange(min=0),
    default=_DEFAULTS["warmup_epochs"],
    show_default=True,
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory: model.safetensors, checkpoint.pt, metrics.jsonl.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a run.")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True)
@click.option(
    "--distill-from",
    help="Label-free: distil from the original model (ibnify checkpoint, weights file of the "
    "base architecture, or a model name with pretrained weights); labels are ignored.",
)
@click.option(
    "--temperature",
    "distill_temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS["distill_temperature"],
    show_default=True,
    help="Distillation temperature.",
)
@click.option(
    "--workers", type=click.IntRange(min=0), default=_DEFAULTS["workers"], show_default=True
)
@click.option("--stop-after", type=click.IntRange(min=1), help="End after N epochs this run.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option("--json", "as_json", is_flag=True, help="Per-epoch lines as JSON (metrics.jsonl's).")
@threads_option
def finetune_command(**options: Any) -> None:
    """Fine-tune an ibnify CHECKPOINT (labelled, or label-free with --distill-from).

    Runs data-parallel under `torchrun --nproc_per_node N -m ibnify finetune ...`.
    """
    import json
    import os
    from dataclasses import fields

    from ..commands.finetune import FinetuneFiles, finetune_files
    from ..commands.inputs import InputRequest
    from ..train.config import FinetuneConfig
    from ..train.progress import FinetuneInterrupted, format_epoch
    from ..train.state import MODEL_FILE

    # The options record: every option named as a FinetuneConfig field goes into the config;
    # the rest (checkpoint, data, teacher, input size, output form) into FinetuneFiles.
    config_fields = {f.name for f in fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: options.pop(k) for k in list(options) if k in config_fields})
    as_json = options.pop("as_json")
    inputs = InputRequest(
        options.pop("data"),
        options.pop("dataset"),
        options.pop("input_size"),
        skip_bad_images=options.pop("skip_bad_images"),
    )
    _one_data_source(inputs.data, inputs.dataset)
    if config.resume and options["force"]:
        raise click.UsageError("--resume and --force exclude each other")
    files = FinetuneFiles(inputs=inputs, **options)

    def on_epoch(metrics: dict) -> None:
        if not config.quiet:
            click.echo(json.dumps(metrics) if as_json else format_epoch(metrics))

    try:
        result = finetune_files(files, config, on_epoch)
    except FinetuneInterrupted as stop:
        raise Interrupted(_interrupt_message(stop)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if result.completed else "stopped; continue with --resume"
        click.echo(f"{state}: wrote {Path(config.out_dir) / MODEL_FILE}")  # type: ignore[arg-type]


def _interrupt_message(stop: Any) -> str:
    """What Ctrl-C kept (the last finished epoch's files) and the command that continues."""
    import shlex

    if not stop.kept:
        return f"{stop}"
    argv = [a for a in invocation(click.get_current_context()) if a != "--force"]
    if "--resume" not in argv:
        argv.append("--resume")
    return f"{stop}; continue with: ibnify {shlex.join(argv)}"


@cli.command("evaluate")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_data_options
@click.option(
    "--domain",
    "domains",
    multiple=True,
    metavar="NAME=FOLDER",
    help="A labelled target-domain folder (the classes of --data), reported beside the "
    "shifts; repeat for more.",
)
@click.option(
    "--shift",
    "shifts",
    show_default="all; none with --domain",
    help="all, none, or a comma list of shifts/groups: brightness, contrast, color, "
    "brightness_up, brightness_down, contrast_up, contrast_down, rgb_plus_50, "
    "r_plus_50, gamma, blur, noise.",
)
@skip_bad_images_option
@image_size_option("models")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG bar chart here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise shift.")
@click.option("--force", is_flag=True, help="Overwrite the plot file if it exists.")
@threads_option
def evaluate_command(checkpoints: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Accuracy of CHECKPOINTS side by side: clean, under appearance shifts and on labelled
    target domains (--domain NAME=FOLDER).
    """
    from ..commands.evaluate import EvaluateFiles, evaluate_files
    from ..commands.inputs import InputRequest

    # The options record: the data options go into the request, the rest are EvaluateFiles'.
    request = ("data", "dataset", "input_size", "skip_bad_images")
    inputs = InputRequest(**{name: options.pop(name) for name in request})
    _one_data_source(inputs.data, inputs.dataset)
    files = EvaluateFiles(checkpoints, inputs, **options)
    plot = files.plot
    report = evaluate_files(files)
    if as_json:
        click.echo(report.to_json())
        return
    counts = "".join(f", {d} {n}" for d, n in report.domain_images.items())
    click.echo(f"{report.dataset}: {report.images} images{counts}; accuracy % (drop from clean)")
    click.echo(report.table())
    if plot is not None:
        click.echo(f"wrote {plot}")


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    default="ibnify-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the plot, report, models.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Fewer epochs (a smoke test, not the README run).")
@click.option("--no-export", is_flag=True, help="Skip the ONNX export and verification.")
@click.option("--force", is_flag=True, help="Overwrite files from an earlier demo run.")
@click.option("--progress", is_flag=True, help="Show per-epoch progress bars.")
@threads_option
def demo_command(
    out_dir: str, seed: int, quick: bool, no_export: bool, force: bool, progress: bool
) -> None:
    """End-to-end demo on real digits: baseline, IBN conversion, control, shifts, ONNX."""
    from .._io import check_output_dir
    from ..demo import DemoConfig, run_demo

    check_output_dir(out_dir)  # a read-only folder: one line before the first model is built
    config = DemoConfig.quick(seed) if quick else DemoConfig(seed=seed)
    config.export = not no_export
    result = run_demo(out_dir, config, force=force, quiet=not progress, echo=click.echo)
    click.echo("")
    click.echo(result.summary())
