"""``ibnify export``, ``ibnify verify`` and ``ibnify bench``: ONNX out, checked and timed."""

from __future__ import annotations

import functools
import sys
from typing import Any

import click

from ..constants import ENGINES, FOLD_FORMS, ONNX_OPSETS, PROFILES
from ._group import _parse_input_size, cli, skip_bad_images_option, threads_option, to_flags

__all__ = ["bench_command", "export_command", "verify_command"]


def _parse_batches(ctx: click.Context, param: click.Parameter, value: str):
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a batch list like 1,4") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r} is not a batch list like 1,4 (sizes ≥ 1)")
    return sizes


def _usage_errors(call, *args: Any) -> Any:
    """Run ``call``; its option refusals (a size the file does not take, a dynamic size the
    file does not record, files at different sizes) become usage errors (exit 2)."""
    from ..errors import InvalidOptionError

    try:
        return call(*args)
    except InvalidOptionError as exc:
        raise click.UsageError(str(exc)) from None


def _export_record(function):
    """Hand the export options to the command as one ``options: ExportOptions``."""

    @functools.wraps(function)
    def command(**kwargs: Any) -> Any:
        from ..deploy.export import ExportOptions

        kwargs["options"] = ExportOptions(
            input_size=kwargs.pop("input_size"),
            opset=kwargs.pop("opset"),
            dynamic_batch=not kwargs.pop("static_batch"),
            fold=not kwargs.pop("no_fold"),
            dynamic_size=kwargs.pop("dynamic_size"),
            profile=kwargs.pop("profile"),
            fold_form=kwargs.pop("fold_form"),
        )
        return function(**kwargs)

    return command


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx file."
)
@click.option(
    "--opset",
    type=int,
    default=18,
    show_default=True,
    help=f"ONNX opset, {ONNX_OPSETS[0]} to {ONNX_OPSETS[-1]}.",
)
@click.option(
    "--input-size",
    callback=_parse_input_size,
    help="Export input: 224 or 3,224,224 (default: the size the checkpoint records, else the "
    "model's own, else 224).",
)
@click.option("--static-batch", is_flag=True, help="Fix the batch axis at 1 (default: dynamic).")
@click.option("--dynamic-size", is_flag=True, help="Also make height and width dynamic axes.")
@click.option("--no-fold", is_flag=True, help="Keep the BN halves as BatchNormalization nodes.")
@click.option(
    "--profile",
    type=click.Choice(PROFILES),
    default="default",
    show_default=True,
    help="fp16: float16 except InstanceNormalization; portable: IN as elementary ops.",
)
@click.option(
    "--fold-form",
    type=click.Choice(FOLD_FORMS),
    default="auto",
    show_default=True,
    help="Graph at each IBN site: auto picks the faster of concat and split-next-conv.",
)
@click.option(
    "--no-verify", is_flag=True, help="Skip the onnxruntime check before the file is written."
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option(
    "-v", "--verbose", is_flag=True, help="List every IBN site left unfolded, with its reason."
)
@threads_option
@_export_record
def export_command(
    checkpoint: str, output: str, options: Any, no_verify: bool, force: bool, verbose: bool
) -> None:
    """Export the converted model in CHECKPOINT to ONNX, verified in onnxruntime.

    BN halves are folded into their convs; the file is checked against PyTorch with the
    profile's tolerance before it is written.
    """
    from ..commands.export import ExportFiles, export_files

    files = ExportFiles(checkpoint, output, options, verify=not no_verify, force=force)
    result = export_files(files)
    click.echo(result.report.details() if verbose else str(result.report))
    if result.verification is not None:
        checked = result.verification
        click.echo(
            f"verified in onnxruntime, profile {options.profile}: max abs error "
            f"{checked.max_abs:.2g} (atol {checked.atol:g}, rtol {checked.rtol:g})"
        )


def _size_option(what: str):
    """``--input-size`` of verify and bench: the size a dynamic-size file runs at."""
    return click.option(
        "--input-size",
        help=f"Size to {what} at: 224 or 3,224,224 (default: the size the file records, else "
        "its fixed input shape; a dynamic-size file that records none needs it).",
    )


def _verify_record(function):
    """Hand the verification options to the command as one ``options: VerifyOptions``."""

    @functools.wraps(function)
    def command(**kwargs: Any) -> Any:
        from ..deploy.verify import VerifyOptions

        kwargs["options"] = VerifyOptions(
            batch_sizes=kwargs.pop("batch"),
            atol=kwargs.pop("atol"),
            rtol=kwargs.pop("rtol"),
            images=kwargs.pop("images"),
            raise_on_failure=False,  # the table is printed before the one error line
            engine=kwargs.pop("engine"),
            input_size=kwargs.pop("input_size"),
            skip_bad_images=kwargs.pop("skip_bad_images"),
        )
        return function(**kwargs)

    return command


@cli.command("verify")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option(
    "--against", required=True, type=click.Path(dir_okay=False), help="ibnify checkpoint."
)
@click.option(
    "--batch", default="1,3", show_default=True, callback=_parse_batches, help="Batch sizes."
)
@click.option(
    "--atol", type=click.FloatRange(min=0), help="Default: the export profile's (fp32: 1e-4)."
)
@click.option(
    "--rtol", type=click.FloatRange(min=0), help="Default: the export profile's (fp32: 1e-3)."
)
@click.option(
    "--images", type=click.Path(file_okay=False), help="Folder of real images to check too."
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="onnxruntime",
    show_default=True,
    help="Runtime to check (openvino needs the ibnify[openvino] extra).",
)
@_size_option("check")
@skip_bad_images_option
@threads_option
@_verify_record
def verify_command(onnx_file: str, against: str, options: Any) -> None:
    """Compare ONNX_FILE in onnxruntime with the PyTorch model in a checkpoint; exit 1 on error."""
    from ..commands.verify import VerifyFiles, verify_files
    from ..errors import VerificationError

    files = VerifyFiles(onnx_file, against, options)
    _usage_errors(files.check)
    report = verify_files(files)
    click.echo(to_flags(str(report)))
    if not report.passed:
        raise VerificationError(report.failure_message())


def _bench_record(function):
    """Hand the timing options to the command as one ``options: BenchOptions``."""

    @functools.wraps(function)
    def command(**kwargs: Any) -> Any:
        from ..deploy.bench import BenchOptions

        kwargs["options"] = BenchOptions(
            batch=kwargs.pop("batch"),
            threads=kwargs.pop("threads"),
            warmup=kwargs.pop("warmup"),
            runs=kwargs.pop("runs"),
            engine=kwargs.pop("engine"),
            input_size=kwargs.pop("input_size"),
        )
        return function(**kwargs)

    return command


@cli.command("bench")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(dir_okay=False), help="A second .onnx to compare.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="onnxruntime",
    show_default=True,
    help="Runtime to time (openvino needs the ibnify[openvino] extra).",
)
@_size_option("time")
@click.option(
    "--kernels",
    is_flag=True,
    help="Also sum onnxruntime's profiled kernel times per model, top op types by extra time.",
)
@_bench_record
def bench_command(onnx_file: str, against: str | None, options: Any, kernels: bool) -> None:
    """Latency of ONNX_FILE (median, p90); with --against, interleaved and a per-run ratio.

    Both files run at one size, which the output names with where it came from. Interleaved
    onnxruntime sessions run with thread spinning off, so neither steals the other's cores;
    the order alternates every run.
    """
    from ..commands.bench import BenchFiles, bench_files

    files = BenchFiles([onnx_file] if against is None else [onnx_file, against], options, kernels)
    _usage_errors(files.check)
    bars: list = []  # the bar appears with the first timed run, after the files have loaded

    def progress(done: int, total: int) -> None:
        if not sys.stderr.isatty():  # off a terminal click prints only the label: a stray line
            return
        if not bars:
            bars.append(click.progressbar(length=total, label="timing", file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(done - bars[0].pos)

    try:
        result = _usage_errors(bench_files, files, progress)
    finally:
        if bars:
            bars[0].__exit__(None, None, None)
    click.echo(to_flags(str(result.report)))
    if result.kernels is not None:
        click.echo(result.kernels.summary())
