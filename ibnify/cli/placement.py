"""``ibnify analyze`` and ``ibnify search``: where the IBN layers should go."""

from __future__ import annotations

from typing import Any

import click

from ._group import (
    _data_options,
    _one_data_source,
    cli,
    image_size_option,
    threads_option,
)

__all__ = ["analyze_command", "search_command"]


@cli.command("analyze")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights for a model name.")
@_data_options
@click.option(
    "--shift",
    "shifts",
    help="Domain B = the data under these shifts (default all, averaged); see `evaluate`.",
)
@click.option(
    "--domain",
    "domains",
    multiple=True,
    metavar="NAME=FOLDER",
    help="Domain B = this target folder (labels optional), domain A = --data/--dataset.",
)
@click.option("--domain-a", type=click.Path(file_okay=False), help="Image folder, domain A.")
@click.option("--domain-b", type=click.Path(file_okay=False), help="Image folder, domain B.")
@image_size_option()
@click.option(
    "--images",
    type=click.IntRange(min=4),
    default=256,
    show_default=True,
    help="Images per domain (a seeded random choice).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG plot here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds the image choice, the content halves and the init of a model without weights.",
)
@click.option("--force", is_flag=True, help="Overwrite the plot file if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def analyze_command(
    model: str, plot: str | None, as_json: bool, force: bool, quiet: bool, **options: Any
) -> None:
    """Feature divergence between two domains at every norm layer (IBN-Net §3): where
    appearance lives in MODEL (a model name or an ibnify checkpoint), and a suggested --stages.
    """
    from .._io import check_output_path
    from ..placement.divergence import AnalyzeOptions, analyze_files

    pair = options["domain_a"] is not None or options["domain_b"] is not None
    if not pair:
        _one_data_source(options["data"], options["dataset"])
    plot_path = check_output_path(plot, force=force, suffixes=(".png",)) if plot else None
    progress = False if quiet or as_json else None
    result = analyze_files(model, AnalyzeOptions(**options, progress=progress))
    report, source = result.report, result.source
    if plot_path is not None:
        report.plot(plot_path)
    if as_json:
        click.echo(report.to_json())
        return
    what = f"shifts: {', '.join(report.shifts)}" if report.shifts else report.domain_b
    click.echo(f"{report.arch}: {report.domain_a} vs {what}; {report.images} images per domain")
    click.echo(report.table())
    click.echo("")
    click.echo(report.summary(report.extras.get("model_args")))
    if source.weights is None and source.checkpoint is None:
        click.echo(
            f"note: {model} was built with random weights (no --weights); an untrained "
            "network's divergence profile says little about where appearance lives"
        )
    if plot_path is not None:
        click.echo(f"wrote {plot_path}")


@cli.command("search")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights for a model name.")
@_data_options
@click.option("--val-data", type=click.Path(file_okay=False), help="Labelled validation folder.")
@click.option(
    "--domain",
    "domains",
    multiple=True,
    metavar="NAME=FOLDER",
    help="A labelled target-domain folder (the classes of the data), evaluated for every "
    "candidate; repeat for more.",
)
@click.option(
    "--objective",
    type=click.Choice(["shifts", "domains", "both"]),
    help="Rank by accuracy under the shifts, on the domains, or both (default: domains when "
    "--domain is given, else shifts).",
)
@click.option(
    "--max-clean-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="PTS",
    help="A candidate this many points of clean accuracy below the control cannot win.",
)
@click.option(
    "--halving/--no-halving",
    default=None,
    help="Successive halving (Optuna's, asynchronous): at each rung after the warmup a candidate "
    "in the worse half of those measured there stops (default: on with more than 3 "
    "candidates; --pruner chooses Hyperband).",
)
@click.option(
    "--pruner",
    type=click.Choice(["none", "halving", "hyperband"]),
    help="Stop weak candidates early: successive halving, Hyperband, or none (default: "
    "--halving's choice).",
)
@click.option(
    "--candidates",
    default="auto",
    show_default=True,
    help='auto, or layouts separated by ";": a:STAGES[@RATIO] or b, e.g. "a:1;a:1-2;a:1-2@0.25;b".',
)
@click.option(
    "--space",
    help='A space to sample instead of --candidates: "a:1-3@0.125..0.75;b" (prefix ends, a '
    "ratio range or list; see docs/search.md); give --trials.",
)
@click.option("--trials", type=click.IntRange(min=1), help="Candidates to sample from --space.")
@click.option(
    "--analyze-first/--no-analyze-first",
    default=True,
    show_default=True,
    help="With --space, the first trial is the stages `analyze` suggests.",
)
@click.option(
    "--storage",
    metavar="URL",
    help="The study's storage: sqlite:///FILE, postgresql://..., or a journal file on shared "
    "disk (default: --out/study.journal).",
)
@click.option("--study", default="ibnify-search", show_default=True, help="The study's name.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine.",
)
@click.option("--devices", metavar="LIST", help="Devices for the workers in turn: cuda:0,cuda:1.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads for torch per worker (default: cores // workers; torch's own choice "
    "with one worker).",
)
@click.option(
    "--join",
    is_flag=True,
    help="Add workers to a study started elsewhere (same options, --storage); exit when no "
    "trial is left.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--shift", "shifts", default="all", show_default=True, help="Shifts to evaluate.")
@image_size_option()
@click.option(
    "--budget-min",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop starting candidates once the estimated time exceeds this many minutes.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="study.journal (the study, unless --storage), candidates/, best.safetensors, "
    "pareto.png, report.json.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--force", is_flag=True, help="Start the study over (discard its finished candidates)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress", is_flag=True, help="Show the fine-tuning progress bars.")
def search_command(model: str, as_json: bool, **options: Any) -> None:
    """Convert, fine-tune and evaluate candidate IBN layouts of MODEL (a model name or an
    unconverted ibnify checkpoint) plus an identically fine-tuned control; rank them.
    """
    from ..placement.search import SearchOptions, search_files

    _one_data_source(options["data"], options["dataset"])
    echo = None if as_json else lambda line: click.echo(line, err=True)
    result = search_files(model, SearchOptions(**options), echo=echo)
    report = result.report
    if options["join"]:
        click.echo(
            f"joined study {options['study']}: no trial is left; the starting command "
            "writes the report"
        )
        return
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(report.table())
    click.echo(f"{report.winner_line()}; {report.rule}")
    if report.winner is not None:
        click.echo(f"reproduce: {result.reproduce_command()}")
    if report.stopped:
        click.echo(report.stopped)
    for label, path in report.files.items():
        click.echo(f"wrote {label}: {path}")
