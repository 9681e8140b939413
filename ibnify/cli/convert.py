"""``ibnify plan`` and ``ibnify convert``: the dry run and the conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._group import _plan_options, cli


def _model_kwargs(num_classes: int | None) -> dict[str, Any]:
    return {"num_classes": num_classes} if num_classes else {}


def _echo_plan(plan, as_json: bool, verbose: bool) -> None:
    if as_json:
        click.echo(plan.to_json())
    else:
        click.echo(plan.details(verbose=verbose))


@cli.command("plan")
@_plan_options
def plan_command(
    model: str, options: Any, num_classes: int | None, as_json: bool, verbose: bool
) -> None:
    """Dry run: show which layers of MODEL change (name, channels, stage, IN/BN split)."""
    from ..api import plan

    conversion = plan(model, model_kwargs=_model_kwargs(num_classes), options=options)
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
    options: Any,
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

    from .._io import check_output_path
    from ..api import convert_named
    from ..core.surgery import get_plan
    from ..models.checkpoint import save

    if weights and pretrained:
        raise click.UsageError("give either --weights or --pretrained, not both")
    target = check_output_path(output, force=force)
    if seed is not None:
        torch.manual_seed(seed)
    converted = convert_named(
        model,
        weights=weights,
        pretrained=pretrained,
        model_kwargs=_model_kwargs(num_classes),
        options=options,
    )
    plan = get_plan(converted)
    _echo_plan(plan, as_json, verbose)
    save(converted, target)
    if not as_json:
        click.echo(f"wrote {Path(target)}")
