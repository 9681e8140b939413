"""Target domains: `evaluate --domain`, `search --domain/--objective/--max-clean-drop/--halving`.

A tiny digits ResNet (width 4) and folders of rendered test digits keep every run to seconds;
the assertions are exact: a domain's accuracy is the single-folder run's, halving's winner is
the full run's file byte for byte, a candidate losing clean accuracy cannot win.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import ibnify
from ibnify.cli import cli
from ibnify.core import apply_plan
from ibnify.core.plans import ConversionPlan
from ibnify.data.digits import digits_data, load_digits_images
from ibnify.data.images import DataError
from ibnify.errors import InvalidOptionError
from ibnify.models.small import digits_resnet
from ibnify.placement.search import search_placement
from ibnify.placement.search_report import CandidateResult, SearchReport
from ibnify.train.config import FinetuneConfig
from tests.cli_process import check_bad_inputs
from tests.helpers import digits_search_argv

SOURCE = "ibnify:digits_resnet"
KWARGS = {"width": 4}


def _digit_folder(root: Path, start: int, count: int, invert: bool, classes: int = 10) -> Path:
    """Test digits ``start..start+count`` as 16×16 PNGs in CLASS sub-folders (of ``classes``)."""
    _tx, _ty, x, y = load_digits_images()
    for index in range(start, start + count):
        label = int(y[index])
        if label >= classes:
            continue
        image = 1 - x[index] if invert else x[index]
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def trained():
    """A briefly trained tiny base model, one thread for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = digits_resnet(**KWARGS)
    ibnify.finetune(base, digits_data("train"), epochs=1, lr=0.1, quiet=True, device="cpu")
    yield base
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    converted = ibnify.convert(trained, stages=(1,), arch=SOURCE, model_kwargs=KWARGS)
    plan = ConversionPlan(
        arch=SOURCE, layout="none", stages=(), ratio=None, sites=(), extras={"model_kwargs": KWARGS}
    )
    paths = {
        "ibn": ibnify.save(converted, root / "ibn.safetensors"),
        "base": ibnify.save(apply_plan(trained, plan), root / "base.safetensors"),
        "inverted": _digit_folder(root / "inverted", 0, 120, invert=True),
        "plain": _digit_folder(root / "plain", 120, 80, invert=False),
    }
    return paths


def _json(args: list[str]) -> dict:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_evaluate_two_domains_equal_two_single_folder_runs(files) -> None:
    checkpoints = [str(files["ibn"]), str(files["base"])]
    domains = ["--domain", f"inv={files['inverted']}", "--domain", f"plain={files['plain']}"]
    both = _json(["evaluate", *checkpoints, "--dataset", "digits", "--json", *domains])
    assert both["shifts"] == ["clean"] and both["domains"] == ["inv", "plain"]
    assert both["domain_images"] == {"inv": 120, "plain": 80}
    for name, folder in (("inv", files["inverted"]), ("plain", files["plain"])):
        single = _json(
            ["evaluate", *checkpoints, "--data", str(folder), "--json", "--shift", "none"]
        )
        for column in ("ibn", "base"):
            assert both["accuracy"][column][name] == single["accuracy"][column]["clean"]
    digits = _json(["evaluate", *checkpoints, "--dataset", "digits", "--json", "--shift", "none"])
    for column in ("ibn", "base"):
        assert both["accuracy"][column]["clean"] == digits["accuracy"][column]["clean"]
    # Python: a folder path or ImageData for the data and the domains, the same numbers
    model = ibnify.load(files["ibn"])
    folders = {"inv": str(files["inverted"]), "plain": files["plain"]}
    report = ibnify.evaluate({"ibn": model}, "digits", shifts="none", domains=folders)
    assert report.accuracy["ibn"] == both["accuracy"]["ibn"]
    table = report.table().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "clean",
        "domain inv",
        "domain plain",
        "mean domain drop",
    ]


def test_evaluate_domain_bad_inputs_end_in_one_error_line(files, tmp_path) -> None:
    other = _digit_folder(tmp_path / "other", 0, 60, invert=True, classes=5)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(unlabelled / "x.png")
    (tmp_path / "empty").mkdir()
    cases = {
        "other classes": ([f"d={other}"], "domain 'd' has 5 classes, the source data 10"),
        "unlabelled": ([f"d={unlabelled}"], "domain 'd' has no class sub-folders"),
        "no folder": (["d="], "--domain 'd=' names no folder; write d=FOLDER"),
        "no name": ([str(other)], "write NAME=FOLDER"),
        "empty": ([f"d={tmp_path / 'empty'}"], "domain 'd': data directory"),
        "twice": ([f"d={other}", "--domain", f"d={other}"], "domain 'd' is given twice"),
    }
    before = sorted(tmp_path.rglob("*"))

    def argv(name: str, args: list[str]) -> list[str]:
        plot = str(tmp_path / f"{name.replace(' ', '-')}.png")
        return [
            "evaluate",
            str(files["ibn"]),
            "--dataset",
            "digits",
            "--plot",
            plot,
            "--domain",
            *args,
        ]

    check_bad_inputs({}, cases, argv)
    assert sorted(tmp_path.rglob("*")) == before


def _result(name: str, clean: float, shifted: float) -> CandidateResult:
    return CandidateResult(name, "a", [1], None, {"clean": clean, "noise": shifted}, 1.0)


def test_max_clean_drop_excludes_a_candidate_that_loses_clean_accuracy() -> None:
    results = [
        _result("control", 0.90, 0.50),
        _result("a:1", 0.85, 0.80),
        _result("a:1-2", 0.895, 0.70),
    ]
    report = SearchReport(results, ["noise"], {}, max_clean_drop=1.0)
    assert report.excluded(results[1]) and not report.excluded(results[2])
    assert report.winner.name == "a:1-2"  # a:1 scores higher under shift but loses 5 points
    assert report.winner_line() == (
        "winner: a:1-2 (clean 89.5%, -0.5 points vs the control; shifts objective 70.0%)"
    )
    row = next(line for line in report.table().splitlines() if "| a:1 " in line)
    assert row.startswith("| -") and "excluded: clean -5.0 vs control" in row
    assert report.to_dict()["excluded"] == ["a:1"]
    unlimited = SearchReport(results, ["noise"], {}, max_clean_drop=None)
    assert unlimited.winner.name == "a:1"
    strict = SearchReport(results, ["noise"], {}, max_clean_drop=0.0)
    assert strict.winner is None and strict.winner_line().startswith("no winner: every")


def test_cli_search_with_a_domain_ranks_by_it(files, tmp_path) -> None:
    out = tmp_path / "search"
    args = digits_search_argv(files["base"], out, "--domain", f"inv={files['inverted']}")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == "domains" and report["domains"] == ["inv"]
    by_name = {r["name"]: r for r in report["results"]}
    assert set(by_name) == {"control", "a:1", "b"}
    assert all(set(r["domains"]) == {"inv"} for r in by_name.values())
    eligible = [n for n in ("a:1", "b") if n not in report["excluded"]]
    best = max(
        eligible, key=lambda n: (by_name[n]["domains"]["inv"], by_name[n]["accuracy"]["clean"])
    )
    assert report["winner"] == best
    header = next(line for line in result.output.splitlines() if line.startswith("| rank"))
    assert "domain inv" in header
    winner_line = next(line for line in result.output.splitlines() if line.startswith("winner"))
    assert "points vs the control; domains objective" in winner_line
    assert "mean accuracy on the target domains" in winner_line
    # the same out with another domain set: the message names what differs
    again = CliRunner().invoke(cli, [*args[:-4], "--out", str(out)])
    assert again.exit_code == 1 and "differs in: domains" in again.output


def test_search_messages_budget_once_in_seconds_and_differences_named(trained, tmp_path) -> None:
    config = FinetuneConfig(epochs=1, lr=0.05, seed=3, quiet=True, device="cpu")
    options = {
        "candidates": "a:1",
        "arch": SOURCE,
        "model_kwargs": KWARGS,
        "shifts": "noise",
        "out_dir": tmp_path,
    }
    train, val = digits_data("train"), digits_data("test")
    lines: list[str] = []
    report = search_placement(
        trained, train, val, config=config, budget_min=1e-9, echo=lines.append, **options
    )
    assert report.stopped.startswith("budget: stopped before candidate 2 of 2 (a:1); ")
    assert " s spent and about " in report.stopped and "0.0 min" not in report.stopped
    assert not any(line.startswith("budget:") for line in lines)  # the CLI prints it, once
    other = FinetuneConfig(epochs=1, lr=0.05, seed=4, quiet=True, device="cpu")
    with pytest.raises(InvalidOptionError, match=r"differs in: finetune\.seed 3 → 4\)"):
        search_placement(trained, train, val, config=other, **options)


def test_cli_search_bad_domain_inputs(files, tmp_path) -> None:
    cases = {
        "objective without domains": (["--objective", "domains"], "needs target domains"),
        "no folder": (["--domain", "x="], "--domain 'x=' names no folder"),
        "other classes": (
            ["--domain", f"x={_digit_folder(tmp_path / 'five', 0, 60, True, classes=5)}"],
            "domain 'x' has 5 classes, the source data 10",
        ),
    }
    before = sorted(tmp_path.rglob("*"))

    def argv(name: str, args: list[str]) -> list[str]:
        out = str(tmp_path / name.replace(" ", "-"))
        return ["search", SOURCE, "--dataset", "digits", "--candidates", "a:1", *args, "--out", out]

    check_bad_inputs({}, cases, argv)
    assert sorted(tmp_path.rglob("*")) == before


def test_python_search_takes_folder_paths(trained, files) -> None:
    config = FinetuneConfig(epochs=1, lr=0.05, seed=3, quiet=True, device="cpu")
    folder = str(files["inverted"])
    report = search_placement(
        trained,
        folder,
        folder,
        candidates="a:1",
        config=config,
        shifts="none",
        budget_min=1e-9,
        arch=SOURCE,
    )
    assert report.settings["train"] == "inverted (120 images)"
    assert report.settings["val"] == "inverted (120 images)"
    assert [r.name for r in report.results] == ["control"] and report.not_run == ["a:1"]
    with pytest.raises(DataError, match="data is a int; give an image folder path"):
        search_placement(trained, 3, folder, config=config)  # type: ignore[arg-type]


def test_the_readme_target_domain_folder_is_deterministic(tmp_path) -> None:
    """examples/target_domain.py (docs/adapt.md "Your own target domain"): ten class folders
    of 16×16 RGB images, the same bytes every run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import target_domain
    finally:
        sys.path.pop(0)
    assert target_domain.write_folder(tmp_path / "one", per_class=3) == 30
    target_domain.write_folder(tmp_path / "two", per_class=3)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert [str(p.parent) for p in one] == [str(d) for d in range(10) for _ in range(3)]
    for path in one:
        assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "two" / path).read_bytes()
    with Image.open(tmp_path / "one" / one[0]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"


def test_cli_analyze_with_a_domain_equals_the_two_folder_run(files) -> None:
    """`analyze --data A --domain night=B` measures A against B exactly as `--domain-a A
    --domain-b B` does (same images, same seed), and names domain B by the domain's name."""
    common = ["analyze", str(files["ibn"]), "--images", "16", "--json", "--quiet"]
    with_domain = _json(
        [*common, "--data", str(files["plain"]), "--domain", f"night={files['inverted']}"]
    )
    two_folders = _json(
        [*common, "--domain-a", str(files["plain"]), "--domain-b", str(files["inverted"])]
    )
    assert with_domain["domain_b"] == "night" and two_folders["domain_b"] == "inverted"
    assert with_domain["sites"] == two_folders["sites"]
    assert with_domain["suggested_stages"] == two_folders["suggested_stages"]


def test_cli_analyze_domain_bad_inputs_end_in_one_line(files, tmp_path) -> None:
    ckpt, plain, inverted = str(files["ibn"]), str(files["plain"]), str(files["inverted"])
    cases = {
        "two domains": (
            ["--data", plain, "--domain", f"a={inverted}", "--domain", f"b={plain}"],
            "give one --domain NAME=FOLDER",
        ),
        "domain and shift": (
            ["--data", plain, "--domain", f"a={inverted}", "--shift", "blur"],
            "--shift applies without --domain",
        ),
        "no folder": (["--data", plain, "--domain", "a="], "names no folder"),
        "other classes": (
            [
                "--data",
                plain,
                "--domain",
                f"few={_digit_folder(tmp_path / 'few', 0, 60, True, classes=5)}",
            ],
            "holds other classes than the source data (source only: 5, 6, 7",
        ),
    }
    for name, (args, message) in cases.items():
        result = CliRunner().invoke(cli, ["analyze", ckpt, *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (name, result.output)
        assert lines[0].startswith("error: ") and message in lines[0], (name, lines[0])
