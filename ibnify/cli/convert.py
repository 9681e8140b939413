"""``ibnify plan`` and ``ibnify convert``: the dry run and the conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._group import _plan_options, cli, model_arg_option

__all__ = ["convert_command", "plan_command"]


def _model_kwargs(num_classes: int | None, model_args: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a model built by name: ``--model-arg``s and the classes."""
    return {**model_args, **({"num_classes": num_classes} if num_classes else {})}


def _echo_plan(plan, as_json: bool, verbose: bool) -> None:
    if as_json:
        click.echo(plan.to_json())
    else:
        click.echo(plan.details(verbose=verbose))


@cli.command("plan")
@_plan_options
@model_arg_option
def plan_command(
    model: str,
    options: Any,
    num_classes: int | None,
    model_args: dict[str, Any],
    as_json: bool,
    verbose: bool,
) -> None:
    """Dry run: show which layers of MODEL change (name, channels, stage, IN/BN split)."""
    from ..api import plan

    kwargs = _model_kwargs(num_classes, model_args)
    conversion = plan(model, model_kwargs=kwargs, options=options)
    _echo_plan(conversion, as_json, verbose)


@cli.command("convert")
@_plan_options
@model_arg_option
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .safetensors.")
@click.option("--weights", type=click.Path(), help="Local weights (.pth/.pt/.safetensors).")
@click.option("--pretrained", is_flag=True, help="Ask torchvision/timm for pretrained weights.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--seed", type=int, help="Seed the random init of a model built without weights.")
def convert_command(model: str, options: Any, output: str, **given: Any) -> None:
    """Convert MODEL to IBN-Net form and write it to OUTPUT (safetensors + recipe).

    MODEL is a model name or an ibnify checkpoint; a checkpoint is converted further (for
    example ``--stages 4`` after IBN-a, or ``--layout b``) and its recipe keeps every plan.
    """
    import torch

    from .._io import check_output_path
    from ..api import convert_named, is_checkpoint_spec
    from ..core.recipe import get_recipe
    from ..errors import InvalidOptionError
    from ..models.checkpoint import save

    weights, pretrained = given["weights"], given["pretrained"]
    kwargs = _model_kwargs(given["num_classes"], given["model_args"])
    if weights and pretrained:
        raise click.UsageError("give either --weights or --pretrained, not both")
    if is_checkpoint_spec(model) and (weights or pretrained or kwargs):
        raise InvalidOptionError(
            f"{model!r} is an ibnify checkpoint, it records its own weights and classes: "
            "--weights, --pretrained, --model-arg and --num-classes apply to a model name"
        )
    target = check_output_path(output, force=given["force"], suffixes=(".safetensors",))
    if given["seed"] is not None:
        torch.manual_seed(given["seed"])
    converted = convert_named(
        model, weights=weights, pretrained=pretrained, model_kwargs=kwargs, options=options
    )
    recipe = get_recipe(converted)
    _echo_plan(recipe.plan, given["as_json"], given["verbose"])
    save(converted, target)
    if not given["as_json"]:
        if len(recipe.plans) > 1:
            click.echo(f"recipe: {recipe.conversions()}")
        if recipe.head is not None and not is_checkpoint_spec(model):
            head = recipe.head
            click.echo(
                f"head {head['name']}: {head['from_classes']} → {head['num_classes']} classes, "
                "fresh weights"
            )
        click.echo(f"wrote {Path(target)}")
