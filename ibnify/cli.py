"""Command line: a thin click layer over the library.

Error convention: every failure prints one line on stderr starting with ``error:`` and exits
with 2 for usage errors, 1 for everything else; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import IbnifyError, first_line

__all__ = ["cli", "main"]


class IbnifyGroup(click.Group):
    """A click group that applies ibnify's one-line error convention to every command."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv
        try:
            result = super().main(
                args=argv,
                prog_name="ibnify",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.UsageError as exc:
            _fail(exc.format_message(), 2, debug)
        except click.Abort:
            _fail("interrupted; nothing was written", 130, debug)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130, debug)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code, debug)
        except IbnifyError as exc:
            _fail(str(exc), 1, debug)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            message = first_line(exc, "")
            _fail(
                f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)",
                1,
                debug,
            )
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    first = " ".join(message.split())
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


def _parse_stages(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from .core.plans import parse_stages

    try:
        return parse_stages(value)
    except IbnifyError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _check_ratio(ctx: click.Context, param: click.Parameter, value: float | None):
    if value is None:
        return None
    if math.isnan(value) or not (0.0 < value < 1.0):
        raise click.BadParameter(
            f"{value} is not strictly between 0 and 1 (the fraction of channels given to IN)",
            ctx=ctx,
            param=param,
        )
    return value


def _parse_input_size(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    try:
        numbers = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size like 224 or 3,224,224") from None
    if len(numbers) == 1:
        numbers = [3, numbers[0], numbers[0]]
    elif len(numbers) == 2:
        numbers = [3, *numbers]
    if len(numbers) != 3 or min(numbers) < 1:
        raise click.BadParameter(f"{value!r} is not a size like 224 or 3,224,224")
    return tuple(numbers)


def _plan_options(function):
    options = [
        click.argument("model"),
        click.option(
            "--layout",
            default="a",
            show_default=True,
            type=click.Choice(
                ["a", "b", "generic", "resnet-a", "resnet-b", "densenet-a", "generic-a"],
                case_sensitive=False,
            ),
            help="a (IBN-a for the model's family), b (IBN-b, ResNet family), or an explicit "
            "layout: resnet-a, resnet-b, densenet-a, generic-a.",
        ),
        click.option(
            "--stages",
            callback=_parse_stages,
            help="Stages to convert, e.g. 1-3 or 1,2 (default: the layout's published stages).",
        ),
        click.option(
            "--ratio",
            type=float,
            callback=_check_ratio,
            help="Fraction of channels given to IN (default 0.5; DenseNet 0.4).",
        ),
        click.option(
            "--input-size",
            callback=_parse_input_size,
            help="Dummy input for shape analysis: 224 or 3,224,224 (default from the model).",
        ),
        click.option("--num-classes", type=click.IntRange(min=1), help="Classifier size."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON."),
        click.option(
            "-v", "--verbose", is_flag=True, help="Also list every unchanged norm and why."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _model_kwargs(num_classes: int | None) -> dict[str, Any]:
    return {"num_classes": num_classes} if num_classes else {}


def _echo_plan(plan, as_json: bool, verbose: bool) -> None:
    if as_json:
        click.echo(plan.to_json())
    else:
        click.echo(plan.details(verbose=verbose))


@click.group(cls=IbnifyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ibnify")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """ibnify: convert a BatchNorm CNN into its IBN-Net form, fine-tune, export to ONNX."""


@cli.command("plan")
@_plan_options
def plan_command(
    model: str,
    layout: str,
    stages: tuple[int, ...] | None,
    ratio: float | None,
    input_size: tuple[int, int, int] | None,
    num_classes: int | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Dry run: show which layers of MODEL change (name, channels, stage, IN/BN split)."""
    from .api import plan

    conversion = plan(
        model,
        layout=layout,
        stages=stages,
        ratio=ratio,
        input_size=input_size,
        model_kwargs=_model_kwargs(num_classes),
    )
    _echo_plan(conversion, as_json, verbose)


@cli.command("convert")
@_plan_options
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .safetensors.")
@click.option("--weights", type=click.Path(), help="Local weights (.pth/.pt/.safetensors).")
@click.option("--pretrained", is_flag=True, help="Ask torchvision/timm for pretrained weights.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--seed", type=int, help="Seed the random init of a model built without weights.")
def convert_command(
    model: str,
    layout: str,
    stages: tuple[int, ...] | None,
    ratio: float | None,
    input_size: tuple[int, int, int] | None,
    num_classes: int | None,
    as_json: bool,
    verbose: bool,
    output: str,
    weights: str | None,
    pretrained: bool,
    force: bool,
    seed: int | None,
) -> None:
    """Convert MODEL to IBN-Net form and write it to OUTPUT (safetensors + recipe)."""
    import torch

    from ._io import check_output_path
    from .api import convert_named
    from .checkpoint import save
    from .core.surgery import get_plan

    if weights and pretrained:
        raise click.UsageError("give either --weights or --pretrained, not both")
    target = check_output_path(output, force=force)
    if seed is not None:
        torch.manual_seed(seed)
    converted = convert_named(
        model,
        layout=layout,
        stages=stages,
        ratio=ratio,
        weights=weights,
        pretrained=pretrained,
        input_size=input_size,
        model_kwargs=_model_kwargs(num_classes),
    )
    plan = get_plan(converted)
    _echo_plan(plan, as_json, verbose)
    save(converted, target)
    if not as_json:
        click.echo(f"wrote {Path(target)}")


def _data_options(function):
    options = [
        click.option(
            "--data",
            type=click.Path(file_okay=False),
            help="ImageFolder directory (CLASS/IMAGE files); timm's transforms for the model.",
        ),
        click.option(
            "--dataset",
            type=click.Choice(["digits"]),
            help="Built-in data set: scikit-learn's handwritten digits as 3×16×16 images.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _one_data_source(data: str | None, dataset: str | None) -> None:
    """The library's check of --data/--dataset, reported as a usage error (exit 2)."""
    from .data import check_data_source

    try:
        check_data_source(data, dataset)
    except IbnifyError as exc:
        raise click.UsageError(str(exc)) from None


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
    import json
    import os

    from .train import MODEL_FILE, FinetuneConfig, finetune_files

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
    from ._io import check_output_path
    from .evaluation import evaluate_files

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
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick(seed) if quick else DemoConfig(seed=seed)
    config.export = not no_export
    result = run_demo(out_dir, config, force=force, quiet=not progress, echo=click.echo)
    click.echo("")
    click.echo(result.summary())


def _parse_batches(ctx: click.Context, param: click.Parameter, value: str):
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a batch list like 1,4") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r} is not a batch list like 1,4 (sizes ≥ 1)")
    return sizes


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx file."
)
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option(
    "--input-size",
    callback=_parse_input_size,
    help="Export input: 224 or 3,224,224 (default from the model, else 224).",
)
@click.option("--static-batch", is_flag=True, help="Fix the batch axis at 1 (default: dynamic).")
@click.option("--dynamic-size", is_flag=True, help="Also make height and width dynamic axes.")
@click.option("--no-fold", is_flag=True, help="Keep the BN halves as BatchNormalization nodes.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
def export_command(
    checkpoint: str,
    output: str,
    opset: int,
    input_size: tuple[int, int, int] | None,
    static_batch: bool,
    dynamic_size: bool,
    no_fold: bool,
    force: bool,
) -> None:
    """Export the converted model in CHECKPOINT to ONNX, BN halves folded into their convs."""
    from ._io import check_output_path
    from .checkpoint import load
    from .deploy.export import export_onnx

    target = check_output_path(output, force=force)
    model = load(checkpoint)
    report = export_onnx(
        model,
        target,
        input_size=input_size,
        opset=opset,
        dynamic_batch=not static_batch,
        fold=not no_fold,
        dynamic_size=dynamic_size,
    )
    click.echo(str(report))


@cli.command("verify")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option(
    "--against", required=True, type=click.Path(dir_okay=False), help="ibnify checkpoint."
)
@click.option(
    "--batch", default="1,3", show_default=True, callback=_parse_batches, help="Batch sizes."
)
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-3, show_default=True)
@click.option(
    "--images", type=click.Path(file_okay=False), help="Folder of real images to check too."
)
def verify_command(
    onnx_file: str,
    against: str,
    batch: tuple[int, ...],
    atol: float,
    rtol: float,
    images: str | None,
) -> None:
    """Compare ONNX_FILE in onnxruntime with the PyTorch model in a checkpoint; exit 1 on error."""
    from .checkpoint import load
    from .deploy.verify import verify_onnx
    from .errors import VerificationError

    model = load(against)
    report = verify_onnx(
        onnx_file,
        model,
        batch_sizes=batch,
        atol=atol,
        rtol=rtol,
        images=images,
        raise_on_failure=False,
    )
    click.echo(str(report))
    if not report.passed:
        raise VerificationError(report.failure_message())


@cli.command("bench")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(dir_okay=False), help="A second .onnx to compare.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True)
def bench_command(
    onnx_file: str, against: str | None, threads: int, batch: int, warmup: int, runs: int
) -> None:
    """onnxruntime latency of ONNX_FILE (median, p90); with --against, interleaved and a ratio."""
    from .deploy.bench import bench_onnx

    paths = [onnx_file] if against is None else [onnx_file, against]
    bars: list = []  # the bar appears with the first timed run, after the files have loaded

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label="timing", file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(done - bars[0].pos)

    try:
        report = bench_onnx(
            paths, batch=batch, threads=threads, warmup=warmup, runs=runs, progress=progress
        )
    finally:
        if bars:
            bars[0].__exit__(None, None, None)
    click.echo(str(report))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="ibnify")


if __name__ == "__main__":  # pragma: no cover
    main()
