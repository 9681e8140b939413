"""``ibnify analyze`` and ``ibnify search``: where the IBN layers should go."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click

from ._group import (
    _data_options,
    _one_data_source,
    cli,
    image_size_option,
    model_arg_text,
    model_options,
    skip_bad_images_option,
    threads_option,
    to_flags,
)

__all__ = ["analyze_command", "search_command"]


@cli.command("analyze")
@click.argument("model")
@model_options
@_data_options
@skip_bad_images_option
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
def analyze_command(model: str, as_json: bool, quiet: bool, **options: Any) -> None:
    """Feature divergence between two domains at every norm layer (IBN-Net §3): where
    appearance lives in MODEL (a model name or an ibnify checkpoint), and a suggested --stages.
    """
    from ..commands.analyze import AnalyzeOptions, analyze_files

    if options["domain_a"] is None and options["domain_b"] is None:
        _one_data_source(options["data"], options["dataset"])
    result = analyze_files(
        AnalyzeOptions(
            model=_model_request(model, options),
            inputs=_input_request(options),
            progress=False if quiet or as_json else None,
            **options,
        )
    )
    report = result.report
    command = _convert_line(result)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "command": command}, indent=2))
        return
    what = f"shifts: {', '.join(report.shifts)}" if report.shifts else report.domain_b
    click.echo(f"{report.arch}: {report.domain_a} vs {what}; {report.images} images per domain")
    click.echo(report.table())
    click.echo("")
    click.echo(to_flags(report.summary()))
    if command is not None:
        click.echo(f"run: {command}")
    if result.model.weights is None and result.model.checkpoint is None:
        click.echo(
            f"note: {model} was built with random weights (no --weights); an untrained "
            "network's divergence profile says little about where appearance lives"
        )
    if options["plot"] is not None:
        click.echo(f"wrote {options['plot']}")


def _model_request(model: str, options: dict[str, Any]) -> Any:
    """MODEL and its options (popped from ``options``) as the command layer's ModelRequest."""
    from ..commands.inputs import ModelRequest

    return ModelRequest(
        model,
        weights=options.pop("weights"),
        num_classes=options.pop("num_classes"),
        model_args=options.pop("model_args"),
    )


def _input_request(options: dict[str, Any]) -> Any:
    """The data options (popped from ``options``) as the command layer's InputRequest."""
    from ..commands.inputs import InputRequest

    return InputRequest(
        data=options.pop("data"),
        dataset=options.pop("dataset"),
        input_size=options.pop("input_size"),
        skip_bad_images=options.pop("skip_bad_images"),
    )


def _model_arguments(model: Any, input_size: Any, seed: int) -> str:
    """The MODEL arguments of a printed ``ibnify convert`` that rebuild ``model`` (a
    ResolvedModel) before conversion: its source, weights, classes and constructor arguments,
    the input size, and the init seed of a model built without weights (or with a fresh
    head)."""
    rebuild = model.rebuild_arguments()
    kwargs = dict(rebuild["model_kwargs"])
    words = [shlex.quote(rebuild["spec"])]
    if rebuild["weights"] is not None:
        words += ["--weights", shlex.quote(str(rebuild["weights"]))]
    if kwargs.get("num_classes") is not None:
        words += ["--num-classes", str(kwargs.pop("num_classes"))]
    kwargs.pop("num_classes", None)
    for key, value in kwargs.items():
        words += ["--model-arg", shlex.quote(model_arg_text(key, value))]
    if input_size is not None:
        words += ["--input-size", ",".join(map(str, input_size))]
    if rebuild["weights"] is None or model.head is not None:
        words += ["--seed", str(seed)]  # the random init the model (or its fresh head) got
    return " ".join(words)


def _convert_line(result: Any) -> str | None:
    """The ``ibnify convert`` command for the analysis' suggestion; None when nothing is
    suggested or the model is converted already."""
    report = result.report
    stages = report.suggested_stages
    if not stages or report.converted:
        return None
    from .._report import stage_range_text

    stem = report.arch.split(":")[-1].replace("/", "_") or "model"
    model = _model_arguments(result.model, result.input_size, result.seed)
    return f"ibnify convert {model} --stages {stage_range_text(stages)} -o {stem}_ibn.safetensors"


@cli.command("search")
@click.argument("model")
@model_options
@_data_options
@skip_bad_images_option
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
    from ..commands.search import search_files

    _one_data_source(options["data"], options["dataset"])
    echo = None if as_json else lambda line: click.echo(line, err=True)
    request = _search_options(model, options)
    result = search_files(request, echo=echo)
    report = result.report
    if request.study.join:
        click.echo(
            f"joined study {request.study.study}: no trial is left; the starting command "
            "writes the report"
        )
        return
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(report.table())
    click.echo(to_flags(f"{report.winner_line()}; {report.rule}"))
    if report.winner is not None:
        click.echo(f"reproduce: {_reproduce_line(result, request)}")
    if report.stopped:
        click.echo(to_flags(report.stopped))
    for label, path in report.files.items():
        click.echo(f"wrote {label}: {path}")


_STUDY_FIELDS = ("storage", "study", "workers", "devices", "threads", "join", "pruner", "space")
_SCHEDULE_FIELDS = ("epochs", "lr", "batch_size", "weight_decay", "warmup_epochs", "seed")


def _search_options(model: str, options: dict[str, Any]) -> Any:
    """The click options as the command layer's SearchOptions: the model, the data, and the
    search (its schedule and study each built once)."""
    from ..commands.search import SearchOptions
    from ..placement.search import SearchInputs
    from ..placement.study import StudyOptions
    from ..train.config import FinetuneConfig

    study = StudyOptions(
        **{name: options.pop(name) for name in _STUDY_FIELDS},
        trials=options.pop("trials"),
        analyze_first=options.pop("analyze_first"),
    )
    schedule = {name: options.pop(name) for name in _SCHEDULE_FIELDS}
    config = FinetuneConfig(**schedule, quiet=not options.pop("progress"))
    return SearchOptions(
        model=_model_request(model, options),
        inputs=_input_request(options),
        val_data=options.pop("val_data"),
        search=SearchInputs(
            config=config, study=study, domains=list(options.pop("domains")), **options
        ),
    )


def _reproduce_line(result: Any, options: Any) -> str:
    """The ``ibnify convert`` + ``ibnify finetune`` commands that rebuild the winner: every
    option that shaped it (model, weights, classes, constructor arguments, input size, the
    init seed of a model built without weights, data, schedule, seed)."""
    from .._report import stage_range_text

    report = result.report
    conversion = report.winner_conversion()
    layout = f"--layout {conversion['layout']}"
    if "stages" in conversion:
        layout += f" --stages {stage_range_text(conversion['stages'])}"
    if "ratio" in conversion:
        layout += f" --ratio {conversion['ratio']:g}"
    seed = options.config.seed
    model = _model_arguments(result.model, result.input_size, seed)
    if options.inputs.dataset is not None:
        data = f"--dataset {options.inputs.dataset}"
    else:
        folders = shlex.quote(str(options.inputs.data)), shlex.quote(str(options.val_data))
        data = f"--data {folders[0]} --val-data {folders[1]}"
    if result.threads is not None:
        data += f" --threads {result.threads}"
    s = report.settings["finetune"]
    return (
        f"ibnify convert {model} {layout} -o ibn.safetensors && "
        f"ibnify finetune ibn.safetensors {data} --epochs {s['epochs']} "
        f"--lr {s['lr']:g} --batch-size {s['batch_size']} --optimizer {s['optimizer']} "
        f"--weight-decay {s['weight_decay']:g} --warmup-epochs {s['warmup_epochs']:g} "
        f"--seed {s['seed']} --out runs/ibn"
    )
