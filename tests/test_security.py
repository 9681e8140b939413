"""Checkpoints from strangers: a crafted recipe opens no other file and makes no connection.

An ibnify checkpoint rebuilds its base model from the recipe in its safetensors metadata. These
tests craft recipes whose constructor arguments would make timm/torchvision unpickle a planted
file, go online or crash, and watch every ``open`` and socket call with ``sys.addaudithook``
while ``ibnify.load`` and the CLI read them. Positive controls show the hook does see the
planted file being opened when the same arguments reach timm directly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import timm
import torch
from safetensors import safe_open

import ibnify
from ibnify.deploy.export import export_onnx
from ibnify.deploy.verify import verify_onnx
from ibnify.errors import CheckpointError, VerificationError
from ibnify.models.checkpoint import FORMAT, Recipe
from ibnify.models.registry import MODEL_KWARGS, check_model_kwargs
from tests.helpers import craft_checkpoint, write_onnx_traps

_NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request")
_DATA_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".npz", ".h5")
_RECORDING: list[tuple[str, str]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _RECORDING is None:
        return
    if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _RECORDING.append(("open", os.fsdecode(args[0])))
    elif event in _NETWORK_EVENTS:
        _RECORDING.append((event, repr(args)[:120]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside _recording()


@contextmanager
def _recording() -> Iterator[list[tuple[str, str]]]:
    global _RECORDING
    events: list[tuple[str, str]] = []
    _RECORDING = events
    try:
        yield events
    finally:
        _RECORDING = None


def _suspicious(events: list[tuple[str, str]], checkpoint: Path, watch: Path) -> list[str]:
    """Opens of anything but the checkpoint under ``watch`` (where the planted files lie), of
    any weights-like data file, or of a download cache; and every network call."""
    allowed = os.path.realpath(checkpoint)
    found = []
    for event, detail in events:
        if event != "open":
            found.append(f"{event} {detail}")
            continue
        path = os.path.realpath(detail)
        if path == allowed or Path(path).name.startswith(".ibnify-probe-"):
            continue
        in_watch = path.startswith(os.path.realpath(watch) + os.sep)
        cache = "/huggingface/" in path or "/torch/hub/" in path
        if in_watch or cache or path.endswith(_DATA_SUFFIXES):
            found.append(f"open {path}")
    return found


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A genuine small ibnify checkpoint whose recipe the tests then rewrite."""
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    model = ibnify.convert("ibnify:digits_resnet", stages=(1,), model_kwargs={"width": 4})
    ibnify.save(model, path)
    return path


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A weights file a crafted recipe points at: unpickling it must never happen."""
    path = tmp_path / "planted.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    return path


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda recipe: recipe.update(fields)


def _old_location(kwargs: dict[str, Any], top: dict[str, Any] | None = None):
    """Files written before the Recipe class repeated model_kwargs in the plan's extras (recipe
    format 1: one ``plan``)."""

    def change(recipe: dict[str, Any]) -> None:
        recipe.update(format="ibnify.checkpoint/1", plan=recipe.pop("plans")[0])
        recipe["plan"].setdefault("extras", {})["model_kwargs"] = kwargs
        if top is None:
            recipe.pop("model_kwargs", None)
        else:
            recipe["model_kwargs"] = top

    return change


CRAFTED = {
    # name: (recipe change with {planted} filled in, text the error must contain)
    "checkpoint-path": (
        lambda p: _set(source="timm:resnet18", model_kwargs={"checkpoint_path": str(p)}),
        "refusing model_kwargs key 'checkpoint_path'",
    ),
    "pretrained-url": (
        lambda p: _set(
            source="timm:resnet18",
            model_kwargs={
                "pretrained": True,
                "pretrained_cfg_overlay": {"url": "http://198.51.100.7/w.pth"},
            },
        ),
        "refusing model_kwargs key 'pretrained'",
    ),
    "hf-hub": (
        lambda p: _set(source="timm:resnet18", model_kwargs={"hf_hub_id": "someone/model"}),
        "refusing model_kwargs key 'hf_hub_id'",
    ),
    "torchvision-weights": (
        lambda p: _set(source="tv:resnet18", model_kwargs={"weights": "DEFAULT"}),
        "refusing model_kwargs key 'weights'",
    ),
    "cache-dir": (
        lambda p: _set(source="timm:resnet18", model_kwargs={"cache_dir": str(p.parent)}),
        "refusing model_kwargs key 'cache_dir'",
    ),
    "old-location-only": (
        lambda p: _old_location({"checkpoint_path": str(p)}),
        "refusing model_kwargs key 'checkpoint_path'",
    ),
    "old-location-hidden-behind-empty-top": (
        lambda p: _old_location({"checkpoint_path": str(p)}, top={}),
        "refusing model_kwargs key 'checkpoint_path'",
    ),
    "object-value": (
        lambda p: _set(model_kwargs={"num_classes": {"path": str(p)}}),
        "refusing model_kwargs key 'num_classes': dict is not an integer",
    ),
    "unknown-key": (
        lambda p: _set(model_kwargs={"norm_layer": "FrozenBatchNorm2d"}),
        "refusing model_kwargs key 'norm_layer'",
    ),
    "unfit-arguments": (
        lambda p: _set(source="tv:resnet18", model_kwargs={"layers": [1, 1, 1, 1]}),
        "model_kwargs layers do not fit tv:resnet18 (TypeError",
    ),
    "hub-source": (
        lambda p: _set(source="hf-hub:someone/model", model_kwargs={}),
        "cannot be built by name",
    ),
    "future-format": (
        lambda p: _set(format="ibnify.checkpoint/9", ibnify_version="7.3.0"),
        "written by ibnify 7.3.0",
    ),
}


# Refused when the model is built (the source resolves, the constructor takes the arguments),
# not when the recipe is read: ibnify.read_recipe accepts these.
_BUILD_TIME = {"hub-source", "unfit-arguments"}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_recipe_opens_nothing_and_connects_nowhere(
    name: str, base_checkpoint: Path, planted: Path, tmp_path: Path
) -> None:
    change, message = CRAFTED[name]
    crafted = craft_checkpoint(base_checkpoint, tmp_path / "crafted.safetensors", change(planted))
    with _recording() as events, pytest.raises(CheckpointError) as raised:
        ibnify.load(crafted)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert _suspicious(events, crafted, tmp_path) == []
    if name not in _BUILD_TIME:
        with pytest.raises(CheckpointError, match=message.split(":")[0]):
            ibnify.read_recipe(crafted)


def test_audit_hook_sees_timm_open_the_planted_file(planted: Path, tmp_path: Path) -> None:
    """Positive control: the same argument given straight to timm opens the planted file, and
    a name lookup is recorded, so the empty lists above mean something."""
    with _recording() as events:
        with suppress(Exception):  # the planted weights do not fit; opening them is the point
            timm.create_model("resnet18", checkpoint_path=str(planted))
        with suppress(OSError):
            socket.getaddrinfo("localhost", 9)
    found = _suspicious(events, tmp_path / "none.safetensors", tmp_path)
    assert f"open {os.path.realpath(planted)}" in found
    assert any(item.startswith("socket.getaddrinfo") for item in found)


def test_genuine_checkpoint_loads_under_the_same_watch(base_checkpoint: Path) -> None:
    """The watch is not so strict that a genuine checkpoint fails it."""
    with _recording() as events:
        model = ibnify.load(base_checkpoint)
    assert model.layer1[0].bn1.IN.num_features == 2
    assert _suspicious(events, base_checkpoint, base_checkpoint.parent) == []


_DRIVER = """
import json, os, sys
events = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        events.append(("open", os.fsdecode(args[0])))
    elif event in {network!r}:
        events.append((event, repr(args)[:120]))
sys.addaudithook(hook)
import atexit
atexit.register(lambda: sys.stdout.write("\\nAUDIT " + json.dumps(events) + "\\n"))
from ibnify.cli import main
main(sys.argv[1:])
"""


def _run_cli(args: list[str]) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]]]:
    script = _DRIVER.format(network=_NETWORK_EVENTS)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    audit = [line for line in done.stdout.splitlines() if line.startswith("AUDIT ")]
    events = [tuple(e) for e in json.loads(audit[-1][6:])] if audit else []
    return done, events  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("checkpoint-path", ["export", "{ckpt}", "-o", "{out}/x.onnx"]),
        ("pretrained-url", ["evaluate", "{ckpt}", "--dataset", "digits"]),
    ],
)
def test_cli_refuses_crafted_checkpoint_in_one_line(
    name: str, command: list[str], base_checkpoint: Path, planted: Path, tmp_path: Path
) -> None:
    change, message = CRAFTED[name]
    crafted = craft_checkpoint(base_checkpoint, tmp_path / "crafted.safetensors", change(planted))
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = [a.format(ckpt=crafted, out=out) for a in command]
    done, events = _run_cli(args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert events, "the audit driver reported nothing"
    assert _suspicious(events, crafted, tmp_path) == []


def test_recipe_stores_model_kwargs_once_and_reads_old_files(
    base_checkpoint: Path, tmp_path: Path
) -> None:
    recipe = ibnify.read_recipe(base_checkpoint)
    assert recipe.format == FORMAT and recipe.model_kwargs == {"width": 4}
    with safe_open(str(base_checkpoint), framework="pt") as handle:
        stored = json.loads(handle.metadata()["ibnify_recipe"])
    assert "model_kwargs" not in stored["plans"][0].get("extras", {})
    assert "model_kwargs" not in stored["plans"][0]
    old = craft_checkpoint(
        base_checkpoint, tmp_path / "old.safetensors", _old_location({"width": 4}, {"width": 4})
    )
    model = ibnify.load(old)
    resaved = tmp_path / "resaved.safetensors"
    ibnify.save(model, resaved)
    assert ibnify.read_recipe(resaved).model_kwargs == {"width": 4}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ibnify.load(resaved).eval()(x), ibnify.load(base_checkpoint).eval()(x), atol=0, rtol=0
        )


def test_recipe_round_trips_as_data(base_checkpoint: Path) -> None:
    recipe = Recipe.from_dict(ibnify.read_recipe(base_checkpoint).to_dict())
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.source == "ibnify:digits_resnet" and recipe.model_kwargs == {"width": 4}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": True}, "True is not an integer"),
        ({"num_classes": 2.5}, "2.5 is not an integer"),
        ({"drop_rate": float("nan")}, "nan is not a number"),
        ({"drop_rate": 1.5}, "1.5 is outside 0..1"),
        ({"global_pool": "../x"}, "is not a short name"),
        ({"replace_stride_with_dilation": [False, "yes", True]}, "'yes' is not true or false"),
        ({"blocks": list(range(1, 20))}, "is not a list of at most 8 ints"),
        ({"pretrained_cfg": "x"}, "load weights, read a file or go online"),
        ({"norm_layer": "FrozenBatchNorm2d"}, "not a network-shaping argument"),
    ],
)
def test_check_model_kwargs_refuses(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_model_kwargs(kwargs)


def test_check_model_kwargs_accepts_network_shapes() -> None:
    good = {
        "num_classes": 7,
        "in_chans": 1,
        "drop_rate": 0,
        "drop_path_rate": 0.1,
        "global_pool": "avgmax",
        "replace_stride_with_dilation": [False, True, True],
        "blocks": [1, 2],
    }
    assert check_model_kwargs(good) == good
    assert not any(key.startswith(("pretrained", "checkpoint", "weights")) for key in MODEL_KWARGS)


@pytest.mark.parametrize(
    ("trap", "message"),
    [
        ("outside", "keeps tensor 'w' in '../secret.bin', outside the model's own folder"),
        ("domain", "uses ops of domain 'com.example.custom' (Pwn), which onnxruntime does not"),
    ],
)
def test_onnx_traps_are_refused_before_onnxruntime_reads_them(
    trap: str, message: str, tmp_path: Path
) -> None:
    from ibnify.deploy.ort import open_session

    path = write_onnx_traps(tmp_path)[trap]
    with pytest.raises(VerificationError) as raised:
        open_session(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_onnx_with_data_beside_it_still_runs(tmp_path: Path) -> None:
    from ibnify.deploy.ort import open_session

    session = open_session(write_onnx_traps(tmp_path)["inside"])
    x = np.zeros((2, 3, 8, 8), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (2, 3, 8, 8)
    assert y[1, :, 4, 4].tolist() == [1.0, 2.0, 3.0]  # the external weights were read


def test_save_refuses_arguments_load_would_refuse(tmp_path: Path) -> None:
    model = ibnify.convert(
        "tv:resnet18", model_kwargs={"norm_layer": torch.nn.BatchNorm2d}, input_size=(3, 32, 32)
    )
    with pytest.raises(
        CheckpointError, match=r"ibnify\.save: refusing model_kwargs key 'norm_layer'"
    ):
        ibnify.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_onnx_metadata_recipe_is_compared_as_data_never_built(
    base_checkpoint: Path, planted: Path, tmp_path: Path
) -> None:
    """verify reads the recipe an ONNX file records only to compare it: a crafted one that
    names a pickle to load and a URL to fetch opens nothing and connects nowhere."""
    model = ibnify.load(base_checkpoint).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, input_size=16)
    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == "ibnify.recipe")
    recipe = json.loads(entry.value)
    overlay = {"url": "http://198.51.100.7/w.pth"}
    recipe["model_kwargs"] = {
        "checkpoint_path": str(planted),
        "pretrained": True,
        "pretrained_cfg_overlay": overlay,
    }
    entry.value = json.dumps(recipe)
    onnx.save(proto, str(path))
    with _recording() as events:
        report = verify_onnx(path, model, batch_sizes=(2,))
    assert report.passed
    assert _suspicious(events, path, tmp_path) == []
