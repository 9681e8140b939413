"""Bad-input matrix: every case runs the CLI in its own process (tests/cli_process.py).

Every case must end with a non-zero exit (2 for usage errors, 1 for failures), exactly one
`error:` line on stderr, no traceback, and no new or changed file anywhere under the case's
directory. The cases are listed in CASES so a reader can see what is covered.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision

import ibnify
from tests.cli_process import run_cli
from tests.helpers import craft_checkpoint, message_problems, write_onnx_traps

SMALL = ["--input-size", "64"]


@dataclass(frozen=True)
class Case:
    """One bad input: CLI arguments ({assets} and {out} are filled in), exit code, message."""

    name: str
    args: list[str]
    code: int
    message: str
    also_absent: list[str] = field(default_factory=list)  # files that must not appear


CASES = [
    # model names and model kinds
    Case("unknown-model", ["plan", "resnet5O"], 1, "unknown model 'resnet5O'; did you mean"),
    Case("unknown-source", ["plan", "hub:resnet50"], 1, "unknown model source 'hub'"),
    Case("no-batchnorm", ["plan", "timm:convnext_atto", *SMALL], 1, "BatchNorm"),
    Case(
        "layout-b-densenet",
        ["plan", "densenet121", "--layout", "b", *SMALL],
        1,
        "ResNet family only",
    ),
    Case("unknown-layout", ["plan", "resnet18", "--layout", "z"], 2, "'z' is not one of"),
    Case(
        "input-too-small",
        ["plan", "densenet121", "--input-size", "16"],
        1,
        "pass a valid input size",
    ),
    Case(
        "input-size-garbage",
        ["plan", "resnet18", "--input-size", "big"],
        2,
        "is not a size like 224",
    ),
    # stages
    Case("stages-0", ["plan", "resnet18", "--stages", "0"], 2, "stages start at 1"),
    Case(
        "stages-5",
        ["plan", "resnet18", "--stages", "5", *SMALL],
        1,
        "stage 5 is out of range: tv:resnet18 has stages 1-4",
    ),
    Case("stages-backwards", ["plan", "resnet18", "--stages", "3-1"], 2, "runs backwards"),
    Case("stages-letter", ["plan", "resnet18", "--stages", "a"], 2, "is not a stage list"),
    Case("stages-empty", ["plan", "resnet18", "--stages", ""], 2, "stages are empty"),
    # ratio
    Case("ratio-0", ["plan", "resnet18", "--ratio", "0"], 2, "not strictly between 0 and 1"),
    Case("ratio-1", ["plan", "resnet18", "--ratio", "1"], 2, "not strictly between 0 and 1"),
    Case(
        "ratio-negative", ["plan", "resnet18", "--ratio", "-0.5"], 2, "not strictly between 0 and 1"
    ),
    Case("ratio-nan", ["plan", "resnet18", "--ratio", "nan"], 2, "not strictly between 0 and 1"),
    # weights files
    Case(
        "weights-missing",
        ["convert", "resnet18", "--weights", "{assets}/nope.pth", "-o", "{out}/m.safetensors"],
        1,
        "does not exist",
    ),
    Case(
        "weights-directory",
        ["convert", "resnet18", "--weights", "{assets}", "-o", "{out}/m.safetensors"],
        1,
        "is a directory",
    ),
    Case(
        "weights-empty",
        ["convert", "resnet18", "--weights", "{assets}/empty.pth", "-o", "{out}/m.safetensors"],
        1,
        "is empty",
    ),
    Case(
        "weights-random-bytes",
        ["convert", "resnet18", "--weights", "{assets}/random.pth", "-o", "{out}/m.safetensors"],
        1,
        "corrupt or truncated",
    ),
    Case(
        "weights-truncated-safetensors",
        [
            "convert",
            "resnet18",
            "--weights",
            "{assets}/truncated.safetensors",
            "-o",
            "{out}/m.safetensors",
        ],
        1,
        "not a valid safetensors file",
    ),
    Case(
        "weights-other-architecture",
        [
            "convert",
            "resnet18",
            "--weights",
            "{assets}/resnet34.pth",
            "-o",
            "{out}/m.safetensors",
            *SMALL,
        ],
        1,
        "do not fit tv:resnet18: 96 unexpected",
    ),
    Case(
        "weights-code-running-pickle",
        ["convert", "resnet18", "--weights", "{assets}/evil.pth", "-o", "{out}/m.safetensors"],
        1,
        "refusing to load",
        also_absent=["{out}/pwned"],
    ),
    Case(
        "weights-and-pretrained",
        [
            "convert",
            "resnet18",
            "--weights",
            "{assets}/resnet34.pth",
            "--pretrained",
            "-o",
            "{out}/m.safetensors",
        ],
        2,
        "either --weights or --pretrained",
    ),
    Case(
        "pretrained-offline",
        ["convert", "resnet18", "--pretrained", "-o", "{out}/m.safetensors"],
        1,
        "could not download pretrained weights",
    ),
    # outputs
    Case(
        "output-dir-missing",
        ["convert", "resnet18", "-o", "{out}/no/such/dir/m.safetensors"],
        1,
        "does not exist; create it first",
    ),
    Case(
        "output-dir-not-writable",
        ["convert", "resnet18", "-o", "/proc/m.safetensors"],
        1,
        "is not writable",
    ),
    Case(
        "output-exists",
        ["convert", "resnet18", "-o", "{out}/existing.safetensors"],
        1,
        "already exists; pass --force",
    ),
    Case("output-is-directory", ["convert", "resnet18", "-o", "{out}"], 1, "is a directory"),
    Case("missing-output-option", ["convert", "resnet18"], 2, "Missing option '-o'"),
    # export, verify, bench
    Case(
        "export-missing-checkpoint",
        ["export", "{assets}/nope.safetensors", "-o", "{out}/m.onnx"],
        1,
        "does not exist",
    ),
    Case(
        "export-plain-weights",
        ["export", "{assets}/resnet34.pth", "-o", "{out}/m.onnx"],
        1,
        "not a valid safetensors checkpoint",
    ),
    Case(
        "export-output-exists",
        ["export", "{assets}/tiny.safetensors", "-o", "{out}/existing.onnx"],
        1,
        "already exists",
    ),
    Case(
        "export-output-not-onnx",
        ["export", "{assets}/tiny.safetensors", "-o", "{out}/m.safetensors"],
        1,
        "does not end in .onnx",
    ),
    Case(
        "export-opset-out-of-range",
        ["export", "{assets}/tiny.safetensors", "-o", "{out}/m.onnx", "--opset", "30"],
        1,
        "opset 30 is outside the range ibnify exports (17 to 20",
    ),
    Case(
        "verify-corrupt-onnx",
        ["verify", "{assets}/corrupt.onnx", "--against", "{assets}/tiny.safetensors"],
        1,
        "is not a valid ONNX model",
    ),
    Case(
        "verify-other-model",
        ["verify", "{assets}/tiny.onnx", "--against", "{assets}/r18.safetensors"],
        1,
        "but the model is tv:resnet18",
    ),
    Case(
        "bench-corrupt-onnx",
        ["bench", "{assets}/corrupt.onnx", "--runs", "1"],
        1,
        "is not a valid ONNX model",
    ),
    Case("bench-missing-onnx", ["bench", "{assets}/nope.onnx"], 1, "does not exist"),
    # files from strangers (tests/test_security.py watches what these open)
    Case(
        "export-crafted-recipe",
        ["export", "{assets}/crafted.safetensors", "-o", "{out}/m.onnx"],
        1,
        "refusing model_kwargs key 'checkpoint_path'",
    ),
    Case(
        "verify-onnx-data-outside-folder",
        ["verify", "{assets}/traps/outside/model.onnx", "--against", "{assets}/tiny.safetensors"],
        1,
        "outside the model's own folder",
    ),
    Case(
        "bench-onnx-unknown-domain",
        ["bench", "{assets}/traps/domain/model.onnx", "--runs", "1"],
        1,
        "which onnxruntime does not provide",
    ),
    # fine-tuning and evaluation data
    Case(
        "finetune-empty-data",
        [
            "finetune",
            "{assets}/tiny.safetensors",
            "--data",
            "{assets}/empty_data",
            "--out",
            "{out}/run",
        ],
        1,
        "holds no images",
    ),
    Case(
        "finetune-corrupt-image",
        [
            "finetune",
            "{assets}/tiny.safetensors",
            "--data",
            "{assets}/bad_images",
            "--num-classes",
            "2",
            "--out",
            "{out}/run",
        ],
        1,
        "is corrupt or not an image",
    ),
    Case(
        "evaluate-empty-data",
        ["evaluate", "{assets}/tiny.safetensors", "--data", "{assets}/empty_data"],
        1,
        "holds no images",
    ),
    Case(
        "evaluate-corrupt-image",
        ["evaluate", "{assets}/tiny.safetensors", "--data", "{assets}/bad_images"],
        1,
        "is corrupt or not an image",
    ),
    Case(
        "evaluate-missing-checkpoint",
        ["evaluate", "{assets}/nope.safetensors", "--dataset", "digits"],
        1,
        "does not exist",
    ),
    Case(
        "resume-other-run",
        [
            "finetune",
            "{assets}/other.safetensors",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--quiet",
            "--out",
            "{assets}/run",
            "--resume",
        ],
        1,
        "was started from another model",
    ),
    Case(
        "resume-nothing",
        [
            "finetune",
            "{assets}/tiny.safetensors",
            "--dataset",
            "digits",
            "--out",
            "{out}",
            "--resume",
        ],
        1,
        "nothing to resume",
    ),
    # command line itself
    Case("unknown-command", ["transmogrify"], 2, "No such command 'transmogrify'"),
    Case("unknown-option", ["plan", "resnet18", "--colour"], 2, "No such option '--colour'"),
]


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _make_assets(assets: Path, out: Path) -> None:
    """Files the cases point at: broken weights, another architecture, a malicious pickle."""
    (assets / "empty.pth").write_bytes(b"")
    (assets / "random.pth").write_bytes(os.urandom(4096))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(256)}, str(assets / "truncated.safetensors"))
    data = (assets / "truncated.safetensors").read_bytes()
    (assets / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(torchvision.models.resnet34().state_dict(), assets / "resnet34.pth")
    with open(assets / "evil.pth", "wb") as handle:
        pickle.dump({"conv1.weight": _Exploit(str(out / "pwned"))}, handle)
    (out / "existing.safetensors").write_bytes(b"the user's previous file")
    (out / "existing.onnx").write_bytes(b"the user's previous file")
    _make_model_assets(assets)


def _make_model_assets(assets: Path) -> None:
    """Small ibnify checkpoints, an ONNX export, image folders and a stopped fine-tune run."""
    from PIL import Image

    from ibnify.deploy.export import export_onnx

    tiny = ibnify.convert("ibnify:digits_resnet", stages=(1, 2), model_kwargs={"width": 4})
    ibnify.save(tiny, assets / "tiny.safetensors")
    planted = {"checkpoint_path": str(assets / "resnet34.pth")}
    craft_checkpoint(
        assets / "tiny.safetensors",
        assets / "crafted.safetensors",
        lambda recipe: recipe.update(source="timm:resnet18", model_kwargs=planted),
    )
    write_onnx_traps(assets / "traps")
    other = ibnify.convert("ibnify:digits_resnet", stages=(1,), model_kwargs={"width": 6})
    ibnify.save(other, assets / "other.safetensors")
    ibnify.save(ibnify.convert("resnet18", input_size=(3, 64, 64)), assets / "r18.safetensors")
    export_onnx(tiny, assets / "tiny.onnx")
    (assets / "corrupt.onnx").write_bytes(os.urandom(2000))
    (assets / "empty_data").mkdir()
    for label, payload in (("zero", None), ("one", (200, 10, 10))):
        (assets / "bad_images" / label).mkdir(parents=True)
        if payload is None:
            (assets / "bad_images" / label / "broken.png").write_bytes(os.urandom(300))
        else:
            Image.new("RGB", (32, 32), payload).save(assets / "bad_images" / label / "ok.png")
    from ibnify.data.digits import digits_data

    ibnify.finetune(
        tiny,
        digits_data("train"),
        epochs=2,
        batch_size=64,
        quiet=True,
        out_dir=str(assets / "run"),
        stop_after=1,
    )


def _snapshot(*roots: Path) -> dict[str, str]:
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            state[str(path)] = digest
    return state


def _command() -> list[str]:
    script = Path(sys.executable).with_name("ibnify")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ibnify"]


_MATRIX: dict[str, tuple[subprocess.CompletedProcess, bool, list[str]]] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, bool, list[str]]]:
    """Every case's result, run once for the tests below."""
    return matrix_results(tmp_path_factory)


def matrix_results(
    tmp_path_factory,
) -> dict[str, tuple[subprocess.CompletedProcess, bool, list[str]]]:
    """Run every case (two at a time) once per session; record its result and the files it left."""
    if _MATRIX:
        return _MATRIX
    root = tmp_path_factory.mktemp("bad_inputs")
    assets = root / "assets"
    assets.mkdir()
    base_out = root / "out-template"
    base_out.mkdir()
    _make_assets(assets, base_out)
    before_assets = _snapshot(assets)

    def run(case: Case):
        out = root / f"out-{case.name}"
        shutil.copytree(base_out, out)
        before = _snapshot(out)
        args = [a.format(assets=assets, out=out) for a in case.args]
        done = run_cli(args, timeout=300)
        unchanged = _snapshot(out) == before
        present = [
            p
            for p in (a.format(assets=assets, out=out) for a in case.also_absent)
            if Path(p).exists()
        ]
        return case.name, (done, unchanged, present)

    with ThreadPoolExecutor(max_workers=2) as pool:
        collected = dict(pool.map(run, CASES))
    collected["__assets_unchanged__"] = (None, _snapshot(assets) == before_assets, [])  # type: ignore[assignment]
    _MATRIX.update(collected)
    return _MATRIX


def test_matrix_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, results) -> None:
    done, unchanged, present = results[case.name]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == case.code, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert case.message in lines[0], lines[0]
    assert unchanged, "a file was created or changed in the output directory"
    assert present == [], f"side effect happened: {present}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_messages_show_no_internals(case: Case, results) -> None:
    """No object reprs, memory addresses or repeated lines (tests/helpers.message_problems)."""
    done = results[case.name][0]
    assert message_problems(done.stderr) == [], done.stderr


def test_assets_untouched(results) -> None:
    assert results["__assets_unchanged__"][1]


def test_version_still_reports(results) -> None:
    """Sanity check of the harness: a good command through the same script succeeds."""
    done = subprocess.run([*_command(), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and ibnify.__version__ in done.stdout
