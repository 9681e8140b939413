"""``ibnify export``, ``ibnify verify`` and ``ibnify bench``: ONNX out, checked and timed."""

from __future__ import annotations

import sys

import click

from ..constants import ENGINES, FOLD_FORMS, ONNX_OPSETS, PROFILES
from ._group import _parse_input_size, cli, threads_option

__all__ = ["bench_command", "export_command", "verify_command"]


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
    help="Export input: 224 or 3,224,224 (default from the model, else 224).",
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
def export_command(
    checkpoint: str,
    output: str,
    opset: int,
    input_size: tuple[int, int, int] | None,
    static_batch: bool,
    dynamic_size: bool,
    no_fold: bool,
    profile: str,
    fold_form: str,
    no_verify: bool,
    force: bool,
    verbose: bool,
) -> None:
    """Export the converted model in CHECKPOINT to ONNX, verified in onnxruntime.

    BN halves are folded into their convs; the file is checked against PyTorch with the
    profile's tolerance before it is written.
    """
    from .._io import check_output_path
    from ..deploy.export import PROFILE_TOLERANCES, check_opset, export_onnx
    from ..deploy.verify import verify_onnx
    from ..models.checkpoint import load

    check_opset(opset)  # before anything loads: torch's exporter would print its IR first
    target = check_output_path(output, force=force, suffixes=(".onnx",))
    model = load(checkpoint)
    atol, rtol = PROFILE_TOLERANCES[profile]
    verified: list = []

    def check(path) -> None:
        batches = (1,) if static_batch else (1, 2)
        verified.append(verify_onnx(path, model, batch_sizes=batches, atol=atol, rtol=rtol))

    report = export_onnx(
        model,
        target,
        input_size=input_size,
        opset=opset,
        dynamic_batch=not static_batch,
        fold=not no_fold,
        dynamic_size=dynamic_size,
        profile=profile,
        fold_form=fold_form,
        check=None if no_verify else check,
    )
    click.echo(report.details() if verbose else str(report))
    if verified:
        click.echo(
            f"verified in onnxruntime, profile {profile}: max abs error "
            f"{verified[0].max_abs:.2g} (atol {atol:g}, rtol {rtol:g})"
        )


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
@threads_option
def verify_command(
    onnx_file: str,
    against: str,
    batch: tuple[int, ...],
    atol: float | None,
    rtol: float | None,
    images: str | None,
    engine: str,
) -> None:
    """Compare ONNX_FILE in onnxruntime with the PyTorch model in a checkpoint; exit 1 on error."""
    from ..deploy.verify import verify_onnx
    from ..errors import VerificationError
    from ..models.checkpoint import load

    model = load(against)
    report = verify_onnx(
        onnx_file,
        model,
        batch_sizes=batch,
        atol=atol,
        rtol=rtol,
        images=images,
        raise_on_failure=False,
        engine=engine,
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
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="onnxruntime",
    show_default=True,
    help="Runtime to time (openvino needs the ibnify[openvino] extra).",
)
@click.option(
    "--kernels",
    is_flag=True,
    help="Also sum onnxruntime's profiled kernel times per model, top op types by extra time.",
)
def bench_command(
    onnx_file: str,
    against: str | None,
    threads: int,
    batch: int,
    warmup: int,
    runs: int,
    engine: str,
    kernels: bool,
) -> None:
    """Latency of ONNX_FILE (median, p90); with --against, interleaved and a per-run ratio.

    Interleaved onnxruntime sessions run with thread spinning off, so neither steals the
    other's cores; the order alternates every run.
    """
    from ..deploy.bench import bench_onnx, kernel_profile

    paths = [onnx_file] if against is None else [onnx_file, against]
    bars: list = []  # the bar appears with the first timed run, after the files have loaded

    def progress(done: int, total: int) -> None:
        if not sys.stderr.isatty():  # off a terminal click prints only the label: a stray line
            return
        if not bars:
            bars.append(click.progressbar(length=total, label="timing", file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(done - bars[0].pos)

    try:
        report = bench_onnx(
            paths,
            batch=batch,
            threads=threads,
            warmup=warmup,
            runs=runs,
            progress=progress,
            engine=engine,
        )
    finally:
        if bars:
            bars[0].__exit__(None, None, None)
    click.echo(str(report))
    if kernels:
        profile_runs = max(1, min(runs, 20))
        profiled = kernel_profile(paths, batch=batch, threads=threads, runs=profile_runs)
        click.echo(profiled.summary())
