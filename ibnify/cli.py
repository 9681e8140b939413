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
from .errors import IbnifyError

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
                prog_name=prog_name or "ibnify",
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
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
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
    from .plan import parse_stages

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
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .safetensors."
)
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
    from .surgery import get_plan

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


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="ibnify")


if __name__ == "__main__":  # pragma: no cover
    main()
