"""The click group and what its commands share: the one-line ``error:`` convention, the
option decorators and the callbacks that hand option checks to the library.

Error convention: every failure prints one line on stderr starting with ``error:`` and exits
with 2 for usage errors, 1 for everything else; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import click

from .. import __version__
from ..constants import BUILTIN_DATASETS
from ..errors import IbnifyError, first_line

__all__ = [
    "PARAMETER_FLAGS",
    "IbnifyGroup",
    "Interrupted",
    "cli",
    "image_size_option",
    "invocation",
    "model_arg_option",
    "model_arg_text",
    "model_options",
    "os_error_line",
    "parse_model_arg_value",
    "skip_bad_images_option",
    "threads_option",
    "to_flags",
]

# The one table from the library's parameter names to the CLI's flags. Library messages name a
# parameter in backquotes (`weights`, `num_classes=10`, `force=True`); the CLI shows the flag.
PARAMETER_FLAGS = {
    "atol": "--atol",
    "batch": "--batch",
    "batch_size": "--batch-size",
    "batch_sizes": "--batch",
    "budget_min": "--budget-min",
    "data": "--data",
    "dataset": "--dataset",
    "distill_from": "--distill-from",
    "domain_a": "--domain-a",
    "domain_b": "--domain-b",
    "domains": "--domain",
    "engine": "--engine",
    "force": "--force",
    "images": "--images",
    "input_size": "--input-size",
    "join": "--join",
    "layout": "--layout",
    "max_clean_drop": "--max-clean-drop",
    "method": "--method",
    "model_args": "--model-arg",
    "num_classes": "--num-classes",
    "objective": "--objective",
    "opset": "--opset",
    "out_dir": "--out",
    "pretrained": "--pretrained",
    "prior": "--prior",
    "ratio": "--ratio",
    "resume": "--resume",
    "rtol": "--rtol",
    "runs": "--runs",
    "shifts": "--shift",
    "space": "--space",
    "skip_bad_images": "--skip-bad-images",
    "stages": "--stages",
    "storage": "--storage",
    "study": "--study",
    "teacher": "--distill-from",
    "threads": "--threads",
    "trials": "--trials",
    "val_data": "--val-data",
    "warmup": "--warmup",
    "weights": "--weights",
    "workers": "--workers",
}
_PARAMETER = re.compile(r"`([a-z_]+)(?:=([^`]*))?`")


def to_flags(message: str) -> str:
    """A library message as the CLI says it: each backquoted parameter of the table becomes
    its flag (``True`` values drop, other values follow the flag); anything else stays."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if name not in PARAMETER_FLAGS:
            return match.group(0)
        if value is None or value == "True":
            return PARAMETER_FLAGS[name]
        return f"{PARAMETER_FLAGS[name]} {value}"

    return _PARAMETER.sub(flag, message)


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
        extra.setdefault("obj", {"argv": argv})  # commands that print a rerun command read it
        try:
            result = super().main(
                args=argv,
                prog_name="ibnify",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())  # plain `ibnify`: the help, as --help prints it
            result = 0
        except click.UsageError as exc:
            _fail(exc.format_message(), 2, debug)
        except click.Abort as exc:  # click turns KeyboardInterrupt into Abort
            _fail(_interrupted(exc.__cause__), 130, debug)
        except KeyboardInterrupt as exc:
            _fail(_interrupted(exc), 130, debug)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code, debug)
        except IbnifyError as exc:
            _fail(str(exc), 1, debug)
        except OSError as exc:
            _fail(os_error_line(exc), 1, debug)
        except (ValueError, RuntimeError, TypeError, KeyError) as exc:
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


# The temp file beside an output that ibnify._io writes and renames: ``.NAME.<8 hex>.tmp``.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")


def _user_path(path: object) -> str | None:
    """The path as the user knows it: a temp file of ours is named by the output it becomes."""
    if path is None:
        return None
    text = str(path)
    head, _, name = text.rpartition("/")
    match = _TEMP_NAME.match(name)
    if match is None:
        return text
    return f"{head}/{match['name']}" if head else match["name"]


def os_error_line(exc: OSError) -> str:
    """One line for every OS error, in every command: the reason and the path the user gave
    (never a temp file they did not make), e.g. ``Permission denied: 'out/m.onnx'``."""
    path = _user_path(exc.filename)
    if path is not None and exc.filename2 is not None and path != str(exc.filename):
        path = _user_path(exc.filename2)
    reason = exc.strerror or first_line(exc, type(exc).__name__)
    where = f": {path!r}" if path is not None else ""
    return f"{reason}{where} (rerun with --debug for the traceback)"


class Interrupted(click.ClickException):
    """Ctrl-C that a command caught to say what it kept and how to continue; exit 130."""

    exit_code = 130


def _interrupted(exc: BaseException | None) -> str:
    """A command that keeps work on Ctrl-C says so in its KeyboardInterrupt; else nothing was."""
    said = str(exc) if isinstance(exc, KeyboardInterrupt) else ""
    return said or "interrupted; nothing was written"


def invocation(ctx: click.Context) -> list[str]:
    """The arguments this ``ibnify`` run was given (for a printed rerun command)."""
    obj = ctx.find_root().obj
    argv = obj.get("argv") if isinstance(obj, dict) else None
    return list(argv) if argv is not None else sys.argv[1:]


def image_size_option(models: str = "model"):
    """``--input-size`` for a command that reads images: the size the model sees, by default
    the one its checkpoint records (``convert --input-size``)."""
    first = "the first checkpoint's" if models == "models" else "the checkpoint's"
    return click.option(
        "--input-size",
        callback=_parse_input_size,
        help=f"Image size the {models} see{'' if models == 'models' else 's'}: 32 or 3,32,32 "
        f"(default: {first}, else the model's own).",
    )


def skip_bad_images_option(function):
    """Add ``--skip-bad-images`` to a command that reads image folders: unreadable images are
    left out (one line says how many and which) instead of refused in one error listing them."""
    return click.option(
        "--skip-bad-images",
        is_flag=True,
        help="Leave unreadable (corrupt) images out, with one line naming them, instead of "
        "stopping with an error that lists them.",
    )(function)


def threads_option(function):
    """Add ``--threads N`` to a command that computes: torch's intra-op threads for the run.

    Absent, torch keeps its default; the command function does not receive the value.
    """

    @functools.wraps(function)
    def command(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return function(*args, **kwargs)

    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="CPU threads for torch (default: torch's own choice).",
    )(command)


def parse_model_arg_value(text: str) -> Any:
    """A ``--model-arg`` value: ``true``/``false``, an int, a float, a comma list of those
    (``2,2`` or ``2,`` for one item), else the text itself."""
    if "," in text:
        return [parse_model_arg_value(item) for item in text.split(",") if item.strip()]
    value = text.strip()
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def model_arg_text(key: str, value: Any) -> str:
    """``KEY=VALUE`` as :func:`parse_model_arg_value` reads it back to ``value``."""

    def one(item: Any) -> str:
        if isinstance(item, bool):
            return str(item).lower()
        return repr(item) if isinstance(item, float) else str(item)

    if isinstance(value, list | tuple):
        text = ",".join(one(item) for item in value) + ("," if len(value) == 1 else "")
    else:
        text = one(value)
    return f"{key}={text}"


def _parse_model_args(ctx: click.Context, param: click.Parameter, value: Any) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` (repeated) → ``{key: value}``; a key outside the recipe
    allowlist, a value that does not fit it, or the class count is a usage error (before
    any model is built)."""
    from ..models.registry import check_model_kwargs

    found: dict[str, Any] = {}
    for text in value or ():
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise click.BadParameter(f"{text!r}: write KEY=VALUE, e.g. in_chans=1", ctx, param)
        if key == "num_classes":
            raise click.BadParameter("give the class count with --num-classes", ctx, param)
        if key in found:
            raise click.BadParameter(f"{key!r} is given twice", ctx, param)
        found[key] = parse_model_arg_value(raw)
        try:
            check_model_kwargs({key: found[key]}, where=text)
        except IbnifyError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return found


def model_arg_option(function):
    """Add ``--model-arg KEY=VALUE`` (repeatable) to a command that builds a model by name; the
    command receives ``model_args`` as a dict, checked against the recipe allowlist."""
    return click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_model_args,
        help="A constructor argument of a model built by name, e.g. in_chans=1 or "
        "replace_stride_with_dilation=false,false,true (repeat for more; only network-shaping "
        "keys, see SECURITY.md).",
    )(function)


def model_options(function):
    """The model options of a command whose MODEL is a name or a checkpoint: ``--weights``,
    ``--num-classes`` and ``--model-arg`` (the last two for a name only)."""
    options = [
        click.option(
            "--weights", type=click.Path(dir_okay=False), help="Weights for a model name."
        ),
        click.option(
            "--num-classes",
            type=click.IntRange(min=1),
            help="Classifier size of a model built by name (weights of another size: fresh head).",
        ),
        model_arg_option,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    first = " ".join(to_flags(message).split())
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


def _library_parser(name: str):
    """A click callback that runs ``ibnify.core.plans.<name>`` on the option's value and turns
    its InvalidOptionError into a usage error (exit 2); the library owns the checks."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        from ..core import plans

        try:
            return getattr(plans, name)(value)
        except IbnifyError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


_parse_stages = _library_parser("parse_stages")
_check_ratio = _library_parser("check_ratio")
_parse_input_size = _library_parser("parse_input_size")


class _LayoutChoice(click.Choice):
    """The layout names of the library's registry, read when a value is checked.

    The registry lives with the layouts (which load torch), so help shows ``LAYOUT`` and the
    names are read only when the command runs; ``--help`` stays fast.
    """

    def __init__(self) -> None:
        super().__init__((), case_sensitive=False)

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from ..core.layouts import layout_choices

        return tuple(layout_choices())

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns; the registry rules
        pass

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "LAYOUT"


def _plan_options(function):
    """Add the plan options to a command; it receives them as one ``options: PlanOptions``."""

    @functools.wraps(function)
    def command(**kwargs: Any) -> Any:
        from ..core.plans import PlanOptions

        kwargs["options"] = PlanOptions(
            layout=kwargs.pop("layout"),
            stages=kwargs.pop("stages"),
            ratio=kwargs.pop("ratio"),
            input_size=kwargs.pop("input_size"),
        )
        return function(**kwargs)

    options = [
        click.argument("model"),
        click.option(
            "--layout",
            default="a",
            show_default=True,
            type=_LayoutChoice(),
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
        command = option(command)
    return command


def _data_options(function):
    options = [
        click.option(
            "--data",
            type=click.Path(file_okay=False),
            help="ImageFolder directory (CLASS/IMAGE files); timm's transforms for the model.",
        ),
        click.option(
            "--dataset",
            type=click.Choice(BUILTIN_DATASETS),
            help="Built-in data set: scikit-learn's handwritten digits as 3×16×16 images.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _one_data_source(data: str | None, dataset: str | None) -> None:
    """The library's check of --data/--dataset, reported as a usage error (exit 2)."""
    from ..data.sources import check_data_source

    try:
        check_data_source(data, dataset)
    except IbnifyError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(cls=IbnifyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ibnify")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """ibnify: convert a BatchNorm CNN into its IBN-Net form, fine-tune, export to ONNX."""
