"""``ibnify analyze`` and ``ibnify search``: where the IBN layers should go."""

from __future__ import annotations

from typing import Any

import click

from ._group import _data_options, _one_data_source, cli


def _load_domains(
    model: Any,
    data: str | None,
    dataset: str | None,
    domain_a: str | None,
    domain_b: str | None,
    shifts: str | None,
    seed: int,
) -> tuple[Any, Any, str | None]:
    """analyze's data options → (domain A, domain B or None, shifts or None); usage errors."""
    from ..data.images import image_folder_data
    from ..data.sources import resolve_data_source
    from ..placement.divergence import check_same_classes

    pair = domain_a is not None or domain_b is not None
    if pair and (data is not None or dataset is not None):
        raise click.UsageError("give --domain-a/--domain-b or --data/--dataset, not both")
    if pair:
        if domain_a is None or domain_b is None:
            raise click.UsageError("give both --domain-a DIR and --domain-b DIR")
        if shifts is not None:
            raise click.UsageError("--shift applies to --data/--dataset (one domain, shifted)")
        first = image_folder_data(domain_a, model, train=False)
        second = image_folder_data(domain_b, model, train=False)
        check_same_classes(first, second)
        return first, second, None
    _one_data_source(data, dataset)
    return resolve_data_source(data, dataset, model, split="test", seed=seed), None, shifts


@cli.command("analyze")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights for a model name.")
@_data_options
@click.option(
    "--shift",
    "shifts",
    help="Domain B = the data under these shifts (default all, averaged); see `evaluate`.",
)
@click.option("--domain-a", type=click.Path(file_okay=False), help="Image folder, domain A.")
@click.option("--domain-b", type=click.Path(file_okay=False), help="Image folder, domain B.")
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
def analyze_command(
    model: str,
    weights: str | None,
    data: str | None,
    dataset: str | None,
    shifts: str | None,
    domain_a: str | None,
    domain_b: str | None,
    images: int,
    batch_size: int,
    plot: str | None,
    as_json: bool,
    seed: int,
    force: bool,
    quiet: bool,
) -> None:
    """Feature divergence between two domains at every norm layer (IBN-Net §3): where
    appearance lives in MODEL (a model name or an ibnify checkpoint), and a suggested --stages.
    """
    # Long only by its option list: each option is one parameter, passed on to the library.
    import torch

    from .._io import check_output_path
    from ..data.shifts import parse_shifts
    from ..placement.divergence import analyze_divergence, load_model_or_checkpoint

    if shifts is not None:
        parse_shifts(shifts)  # fail on a bad --shift before loading anything
    plot_path = check_output_path(plot, force=force) if plot else None
    torch.manual_seed(seed)  # a model built without weights gets the same init every run
    source = load_model_or_checkpoint(model, weights)
    first, second, shifts = _load_domains(
        source.model, data, dataset, domain_a, domain_b, shifts, seed
    )
    report = analyze_divergence(
        source.model,
        first,
        second,
        shifts=shifts or "all",
        images=images,
        batch_size=batch_size,
        seed=seed,
        progress=False if quiet or as_json else None,
        arch=source.source,
    )
    report.extras["model_args"] = source.convert_args()
    if plot_path is not None:
        report.plot(plot_path)
    if as_json:
        click.echo(report.to_json())
        return
    what = f"shifts: {', '.join(report.shifts)}" if report.shifts else report.domain_b
    click.echo(f"{report.arch}: {report.domain_a} vs {what}; {report.images} images per domain")
    click.echo(report.table())
    click.echo("")
    click.echo(report.summary(source.convert_args()))
    if source.weights is None and source.checkpoint is None:
        click.echo(
            f"note: {model} was built with random weights (no --weights); an untrained "
            "network's divergence profile says little about where appearance lives"
        )
    if plot_path is not None:
        click.echo(f"wrote {plot_path}")


def _search_data(
    model: Any, data: str | None, dataset: str | None, val_data: str | None, seed: int
) -> tuple[Any, Any, str]:
    """search's training and validation data, and the same options for `ibnify finetune`."""
    from ..data.digits import digits_data
    from ..data.images import image_folder_data

    if dataset is not None:
        train, val = digits_data("train", seed=seed), digits_data("test", seed=seed)
        return train, val, f"--dataset {dataset}"
    train = image_folder_data(data, model, train=True)  # type: ignore[arg-type]
    val = image_folder_data(val_data, model, train=False)  # type: ignore[arg-type]
    return train, val, f"--data {data} --val-data {val_data}"


@cli.command("search")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights for a model name.")
@_data_options
@click.option("--val-data", type=click.Path(file_okay=False), help="Labelled validation folder.")
@click.option(
    "--candidates",
    default="auto",
    show_default=True,
    help='auto, or layouts separated by ";": a:STAGES[@RATIO] or b, e.g. "a:1;a:1-2;a:1-2@0.25;b".',
)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--shift", "shifts", default="all", show_default=True, help="Shifts to evaluate.")
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
    help="results.jsonl, candidates/, best.safetensors, pareto.png, report.json.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Discard the results recorded in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress", is_flag=True, help="Show the fine-tuning progress bars.")
def search_command(
    model: str,
    weights: str | None,
    data: str | None,
    dataset: str | None,
    val_data: str | None,
    candidates: str,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    warmup_epochs: float,
    shifts: str,
    budget_min: float | None,
    out_dir: str,
    seed: int,
    force: bool,
    as_json: bool,
    progress: bool,
) -> None:
    """Convert, fine-tune and evaluate candidate IBN layouts of MODEL (a model name or an
    unconverted ibnify checkpoint) plus an identically fine-tuned control; rank them.
    """
    # Long only by its option list: each option is one parameter, passed on to the library.
    import torch

    from ..data.shifts import parse_shifts
    from ..placement.divergence import load_model_or_checkpoint
    from ..placement.search import parse_candidates, search_placement
    from ..placement.search_report import RANK_RULE
    from ..train.config import FinetuneConfig

    _one_data_source(data, dataset)
    if data is not None and val_data is None:
        raise click.UsageError("give --val-data DIR with --data")
    parse_shifts(shifts)  # fail on bad options before loading anything
    if candidates.strip().lower() != "auto":
        parse_candidates(candidates)
    torch.manual_seed(seed)  # a model built without weights gets the same init every run
    source = load_model_or_checkpoint(model, weights)
    train, val, data_args = _search_data(source.model, data, dataset, val_data, seed)
    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=seed,
        quiet=not progress,
    )
    report = search_placement(
        source.model,
        train,
        val,
        candidates=candidates,
        config=config,
        shifts=shifts,
        budget_min=budget_min,
        out_dir=out_dir,
        force=force,
        arch=source.source,
        model_kwargs=source.model_kwargs or None,
        echo=None if as_json else lambda line: click.echo(line, err=True),
    )
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(report.table())
    command = report.reproduce_command(source.convert_args(), data_args)
    if report.winner is not None:
        click.echo(f"winner: {report.winner.name} ({RANK_RULE})")
        click.echo(f"reproduce: {command}")
    if report.stopped:
        click.echo(report.stopped)
    for label, path in report.files.items():
        click.echo(f"wrote {label}: {path}")
