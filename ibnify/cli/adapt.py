"""``ibnify adapt``: the BN statistics of a checkpoint re-estimated on target images (AdaBN)."""

from __future__ import annotations

import click

from ._group import cli, image_size_option, threads_option

__all__ = ["adapt_command"]


@cli.command("adapt")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    required=True,
    type=click.Path(file_okay=False),
    help="Target-domain image folder; labels optional (with CLASS sub-folders: a before/after "
    "table).",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="New .safetensors."
)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    help="Use at most N target images (a seeded random choice; default all).",
)
@click.option(
    "--prior",
    default="0",
    metavar="0..1",
    show_default=True,
    help="Weight of the source statistics, 0..1: new = prior*source + (1-prior)*target "
    "(1 = no change).",
)
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True)
@image_size_option()
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the image choice.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the before/after report as JSON.")
@threads_option
def adapt_command(
    checkpoint: str,
    data: str,
    output: str,
    images: int | None,
    prior: str,
    batch_size: int,
    input_size: tuple[int, int, int] | None,
    seed: int,
    force: bool,
    as_json: bool,
) -> None:
    """Re-estimate the BatchNorm statistics of CHECKPOINT on unlabelled target images (AdaBN)
    and write the adapted model to a new file; the source checkpoint is left untouched.
    """
    import json

    from ..adaptation import AdaptOptions, adapt_file, check_prior

    options = AdaptOptions(images, check_prior(prior), batch_size, seed)
    result = adapt_file(checkpoint, data, output, options, input_size=input_size, force=force)
    if as_json:
        report = result.report.to_dict() if result.report is not None else None
        summary = {"images": result.images, "prior": options.prior, "output": str(result.path)}
        click.echo(json.dumps({**summary, "report": report}, indent=2))
        return
    click.echo(
        f"adapted the BN statistics on {result.images} images of {data} (prior {options.prior:g})"
    )
    if result.report is not None:
        click.echo("accuracy % on the target data, before and after:")
        click.echo(result.report.table())
    click.echo(f"wrote {result.path}")
