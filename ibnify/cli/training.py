"""``ibnify finetune``, ``ibnify evaluate`` and ``ibnify demo``: training and measuring."""

from __future__ import annotations

from pathlib import Path

import click

from ._group import _data_options, _one_data_source, cli


@cli.command("finetune")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_data_options
@click.option("--val-data", type=click.Path(file_okay=False), help="Labelled validation folder.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images per process and step.",
)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option(
    "--decay-norm/--no-decay-norm",
    default=True,
    show_default=True,
    help="Weight decay on BN affine and biases (reference recipe: yes; timm: no).",
)
@click.option(
    "--decay-in/--no-decay-in",
    default=True,
    show_default=True,
    help="Weight decay on the InstanceNorm affine of the IBN layers.",
)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory: model.safetensors, checkpoint.pt, metrics.jsonl.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--distill-from",
    help="Label-free: distil from the original model (ibnify checkpoint, weights file of the "
    "base architecture, or a model name with pretrained weights); labels are ignored.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="Distillation temperature.",
)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--stop-after", type=click.IntRange(min=1), help="End after N epochs this run.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def finetune_command(
    checkpoint: str,
    data: str | None,
    dataset: str | None,
    val_data: str | None,
    epochs: int,
    lr: float,
    batch_size: int,
    optimizer: str,
    weight_decay: float,
    decay_norm: bool,
    decay_in: bool,
    warmup_epochs: float,
    out_dir: str,
    resume: bool,
    force: bool,
    seed: int,
    distill_from: str | None,
    temperature: float,
    workers: int,
    stop_after: int | None,
    quiet: bool,
) -> None:
    """Fine-tune an ibnify CHECKPOINT (labelled, or label-free with --distill-from).

    Runs data-parallel under `torchrun --nproc_per_node N -m ibnify finetune ...`.
    """
    # Long only by its option list: each option is one parameter, passed on to the library.
    import json
    import os

    from ..train.config import FinetuneConfig
    from ..train.loop import finetune_files
    from ..train.state import MODEL_FILE

    _one_data_source(data, dataset)
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        decay_norm_and_bias=decay_norm,
        decay_in_affine=decay_in,
        warmup_epochs=warmup_epochs,
        distill_temperature=temperature,
        seed=seed,
        workers=workers,
        out_dir=out_dir,
        resume=resume,
        stop_after=stop_after,
        quiet=quiet,
    )

    def on_epoch(metrics: dict) -> None:
        if not quiet:
            click.echo(json.dumps(metrics))

    result = finetune_files(
        checkpoint,
        config,
        data=data,
        dataset=dataset,
        val_data=val_data,
        distill_from=distill_from,
        force=force,
        on_epoch=on_epoch,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if result.completed else "stopped; continue with --resume"
        click.echo(f"{state}: wrote {Path(out_dir) / MODEL_FILE}")


@cli.command("evaluate")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_data_options
@click.option(
    "--shift",
    "shifts",
    default="all",
    show_default=True,
    help="all, or a comma list of shifts/groups: brightness, contrast, color, "
    "brightness_up, brightness_down, contrast_up, contrast_down, rgb_plus_50, "
    "r_plus_50, gamma, blur, noise.",
)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG bar chart here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise shift.")
@click.option("--force", is_flag=True, help="Overwrite the plot file if it exists.")
def evaluate_command(
    checkpoints: tuple[str, ...],
    data: str | None,
    dataset: str | None,
    shifts: str,
    plot: str | None,
    as_json: bool,
    batch_size: int,
    workers: int,
    seed: int,
    force: bool,
) -> None:
    """Accuracy of CHECKPOINTS side by side, clean and under appearance shifts."""
    from .._io import check_output_path
    from ..evaluation import evaluate_files

    _one_data_source(data, dataset)
    plot_path = check_output_path(plot, force=force) if plot else None
    report = evaluate_files(
        checkpoints,
        data=data,
        dataset=dataset,
        shifts=shifts,
        batch_size=batch_size,
        seed=seed,
        workers=workers,
    )
    if plot_path is not None:
        report.plot(plot_path)
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(f"{report.dataset}: {report.images} images; accuracy % (drop from clean)")
    click.echo(report.table())
    if plot_path is not None:
        click.echo(f"wrote {plot_path}")


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
def demo_command(
    out_dir: str, seed: int, quick: bool, no_export: bool, force: bool, progress: bool
) -> None:
    """End-to-end demo on real digits: baseline, IBN conversion, control, shifts, ONNX."""
    from ..demo import DemoConfig, run_demo

    config = DemoConfig.quick(seed) if quick else DemoConfig(seed=seed)
    config.export = not no_export
    result = run_demo(out_dir, config, force=force, quiet=not progress, echo=click.echo)
    click.echo("")
    click.echo(result.summary())
