"""``ibnify adapt``: a checkpoint adapted to unlabelled target images, by AdaBN (``--method bn``,
the BN statistics) or entropy minimisation (``--method entropy``, the BN and/or IN affine)."""

from __future__ import annotations

from typing import Any

import click

from ._group import cli, image_size_option, skip_bad_images_option, threads_option

__all__ = ["METHOD_CHOICES", "NORMS_CHOICES", "adapt_command"]

# Spelled out so that --help does not load torch; a test checks them against the library's.
METHOD_CHOICES = ("bn", "entropy")
NORMS_CHOICES = ("bn", "in", "both")
_NORMS_TEXT = {"bn": "the BN", "in": "the IN", "both": "the BN and IN"}


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
    "--method",
    type=click.Choice(METHOD_CHOICES),
    default="bn",
    show_default=True,
    help="bn: re-estimate the BN statistics (AdaBN). entropy: the norms' affine parameters "
    "minimise the prediction entropy (TENT-style, reliable samples only), then bn.",
)
@click.option(
    "--norms",
    type=click.Choice(NORMS_CHOICES),
    help="entropy: whose affine learns (default: both where the model has IN, else bn).",
)
@click.option("--epochs", type=int, help="entropy: passes over the target images (default 1).")
@click.option("--steps", type=int, help="entropy: at most this many updates in all.")
@click.option("--lr", type=float, help="entropy: SGD learning rate (default 0.005).")
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
@click.option(
    "--source",
    metavar="DATA",
    help="Labelled source data (a CLASS-folder tree, or digits): its clean accuracy before and "
    "after goes in the table, so an adaptation that destroys it shows.",
)
@image_size_option()
@skip_bad_images_option
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the image choice and order."
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the before/after report as JSON.")
@threads_option
def adapt_command(checkpoint: str, data: str, output: str, as_json: bool, **given: Any) -> None:
    """Adapt CHECKPOINT to unlabelled target images and write the adapted model to a new file;
    the source checkpoint is left untouched.
    """
    import json

    # The options record is checked first; the adaptation package is imported after.
    from ..adaptation.options import AdaptOptions, check_prior
    from ..errors import InvalidOptionError

    files_fields = ("input_size", "force", "source", "skip_bad_images")
    reading = {name: given.pop(name) for name in files_fields}
    source = reading["source"]
    entropy_only = [name for name in ("norms", "epochs", "steps", "lr") if given[name] is not None]
    if given["method"] == "bn" and entropy_only:
        raise InvalidOptionError(  # a CLI-only combination: said with the flags
            f"{', '.join(f'--{name}' for name in entropy_only)} "
            f"{'applies' if len(entropy_only) == 1 else 'apply'} to --method entropy only "
            "(--method bn re-estimates statistics in one pass and learns nothing); add --method "
            "entropy"
        )
    options = AdaptOptions(**{**given, "prior": check_prior(given["prior"])})
    from ..adaptation import adaptations
    from ..commands.adapt import AdaptFiles, adapt_files

    files = AdaptFiles(checkpoint, data, output, options, **reading)
    result = adapt_files(files)
    record = adaptations(result.model)[-1]
    if as_json:
        report = result.report.to_dict() if result.report is not None else None
        summary = {"images": result.images, "prior": options.prior, "output": str(result.path)}
        click.echo(json.dumps({**summary, "adaptation": record, "report": report}, indent=2))
        return
    click.echo(_summary(record, result.images, data, options.prior))
    if result.report is not None:
        where = "source and target" if source is not None else "target"
        click.echo(f"accuracy % on the {where} data, before and after:")
        click.echo(result.report.table())
    click.echo(f"wrote {result.path}")


def _summary(record: dict, images: int, data: str, prior: float) -> str:
    """The first line: what was adapted, on how many images."""
    if record["kind"] != "entropy":
        return f"adapted the BN statistics on {images} images of {data} (prior {prior:g})"
    epochs = record["epochs"]
    return (
        f"adapted {_NORMS_TEXT[record['norms']]} affine by entropy minimisation on {images} "
        f"images of {data} ({epochs} epoch{'s' if epochs != 1 else ''}, {record['updates']} "
        f"updates, {record['kept']} of {record['seen']} samples under the entropy margin), then "
        f"the BN statistics (prior {prior:g})"
    )
