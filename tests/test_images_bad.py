"""Unreadable images: every one found before a run starts and refused in one error that lists
them, or left out with ``skip_bad_images`` (one line says which) without moving any label."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ibnify
from ibnify.commands.inputs import InputRequest, resolve_inputs
from ibnify.data.images import DataError, image_folder_data, unreadable_images
from ibnify.data.sources import as_image_data
from ibnify.models.registry import build_model
from tests.cli_process import run_cli

LOGGER = "ibnify.data.images"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("ibnify:digits_resnet", width=4)[0]


def _encoded(fmt: str, seed: int, side: int = 24) -> bytes:
    """A noise image encoded as ``fmt`` (noise: nothing compresses it away)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _good(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encoded("JPEG" if path.suffix == ".jpg" else "PNG", seed))
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut in half: its header opens, only a full decode finds the missing data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encoded("JPEG", 7, side=64)
    path.write_bytes(data[: len(data) // 2])
    return path


def _three_classes(root: Path) -> None:
    """Classes a, b, c: a holds only bad files, b two good and two bad, c two good."""
    (root / "a").mkdir(parents=True)
    (root / "a" / "junk.png").write_bytes(b"not an image at all")
    _good(root / "b" / "0.png", 1)
    _truncated_jpeg(root / "b" / "1.jpg")
    (root / "b" / "2.jpg").write_bytes(b"")
    _good(root / "b" / "3.jpg", 2)
    _good(root / "c" / "0.png", 3)
    _good(root / "c" / "1.png", 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and the three-class folder with three unreadable files."""
    root = tmp_path_factory.mktemp("evaluate")
    model = ibnify.convert(
        "ibnify:digits_resnet", stages=(1,), model_kwargs={"width": 4, "num_classes": 3}
    )
    checkpoint = root / "m.safetensors"
    ibnify.save(model, checkpoint)
    _three_classes(root / "data")
    return checkpoint, root / "data"


def test_a_truncated_jpeg_is_found_although_its_header_opens(tmp_path: Path) -> None:
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(cut) as image:  # what a header-only check sees: a fine 24x24 JPEG
        assert image.size == (64, 64)
    png = tmp_path / "cut.png"
    png.write_bytes(_encoded("PNG", 3)[:200])
    good = [_good(tmp_path / "ok.jpg"), _good(tmp_path / "ok.png")]
    assert unreadable_images([good[0], cut, good[1], png]) == [cut, png]


def test_every_unreadable_image_is_refused_in_one_error(tmp_path: Path, model) -> None:
    _three_classes(tmp_path / "data")
    with pytest.raises(DataError) as raised:
        image_folder_data(tmp_path / "data", model)
    assert str(raised.value) == (
        f"3 images in {str(tmp_path / 'data')!r} are corrupt or not images: a/junk.png, "
        "b/1.jpg, b/2.jpg; remove them or pass `skip_bad_images=True` to leave them out"
    )


def test_one_unreadable_image_is_named_in_the_singular(tmp_path: Path, model) -> None:
    _good(tmp_path / "flat" / "0.png")
    (tmp_path / "flat" / "1.png").write_bytes(b"x")
    with pytest.raises(DataError) as raised:
        image_folder_data(tmp_path / "flat", model)
    assert str(raised.value) == (
        f"1 image in {str(tmp_path / 'flat')!r} is corrupt or not an image: 1.png; remove it "
        "or pass `skip_bad_images=True` to leave it out"
    )


def test_the_list_names_ten_files_then_counts_the_rest(tmp_path: Path, model) -> None:
    root = tmp_path / "many"
    _good(root / "k" / "good.png")
    for i in range(13):
        (root / "k" / f"bad{i:02d}.png").write_bytes(b"broken")
    with pytest.raises(DataError) as raised:
        image_folder_data(root, model)
    named = ", ".join(f"k/bad{i:02d}.png" for i in range(10))
    assert f"13 images in {str(root)!r} are corrupt or not images: {named} and 3 more;" in str(
        raised.value
    )


def test_skipping_keeps_every_class_and_every_label(tmp_path: Path, model, caplog) -> None:
    root = tmp_path / "data"
    _three_classes(root)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = image_folder_data(root, model, skip_bad_images=True)
    # class a lost all its files and still holds index 0: b stays 1, c stays 2
    assert data.dataset.classes == ["a", "b", "c"] and data.num_classes == 3
    kept = [(Path(p).relative_to(root).as_posix(), label) for p, label in data.dataset.samples]
    assert kept == [("b/0.png", 1), ("b/3.jpg", 1), ("c/0.png", 2), ("c/1.png", 2)]
    assert data.dataset.targets == [1, 1, 2, 2] and len(data) == 4
    assert [data.dataset[i][1] for i in range(4)] == [1, 1, 2, 2]
    assert data.skipped == ("a/junk.png", "b/1.jpg", "b/2.jpg")
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [f"skipped 3 unreadable images in {root}: a/junk.png, b/1.jpg, b/2.jpg"]


def test_skipping_in_an_unlabelled_folder_and_through_the_resolver(
    tmp_path: Path, model, files
) -> None:
    root = tmp_path / "flat"
    for i in (0, 2, 3):
        _good(root / f"{i}.png", i)
    (root / "1.png").write_bytes(b"broken")
    data = as_image_data(root, model, skip_bad_images=True)
    assert [f.name for f in data.dataset.files] == ["0.png", "2.png", "3.png"]
    assert data.skipped == ("1.png",) and not data.labelled
    with pytest.raises(DataError, match=r"1 image in .* is corrupt or not an image: 1\.png;"):
        as_image_data(root, model)
    # the command layer's request carries the choice to every folder it reads
    checkpoint = files[0]
    request = InputRequest(data=tmp_path / "labelled", skip_bad_images=True)
    _three_classes(tmp_path / "labelled")
    assert len(resolve_inputs(request, checkpoint).data("test")) == 4
    strict = InputRequest(data=tmp_path / "labelled")
    with pytest.raises(DataError, match=r"^3 images in "):
        resolve_inputs(strict, checkpoint).data("test")


def test_a_folder_of_only_unreadable_images_is_refused_even_when_skipping(
    tmp_path: Path, model
) -> None:
    (tmp_path / "bad" / "k").mkdir(parents=True)
    (tmp_path / "bad" / "k" / "x.png").write_bytes(b"no")
    with pytest.raises(DataError, match=re.escape("holds no readable images")):
        image_folder_data(tmp_path / "bad", model, skip_bad_images=True)


def test_evaluate_lists_the_unreadable_images_in_one_line(files) -> None:
    checkpoint, data = files
    done = run_cli(["evaluate", str(checkpoint), "--data", str(data), "--shift", "none"])
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"error: 3 images in {str(data)!r} are corrupt or not images: a/junk.png, b/1.jpg, "
        "b/2.jpg; remove them or pass --skip-bad-images to leave them out\n"
    )


@pytest.mark.parametrize("command", ["evaluate", "finetune", "adapt"])
def test_skip_bad_images_says_once_what_it_left_out(files, command: str, tmp_path: Path) -> None:
    checkpoint, data = files
    argv = {
        "evaluate": ["--data", str(data), "--shift", "none"],
        "finetune": ["--data", str(data), "--epochs", "1", "--out", str(tmp_path / "run")],
        "adapt": ["--data", str(data), "-o", str(tmp_path / "a.safetensors")],
    }[command]
    done = run_cli([command, str(checkpoint), *argv, "--skip-bad-images"])
    assert done.returncode == 0, done.stderr
    line = f"skipped 3 unreadable images in {data}: a/junk.png, b/1.jpg, b/2.jpg"
    assert done.stderr.splitlines().count(line) == 1
    assert "error" not in done.stderr


def test_evaluate_reads_its_target_domains_by_the_same_rule(files, tmp_path: Path) -> None:
    checkpoint, bad = files
    clean = tmp_path / "clean"
    for index, name in enumerate("abc"):
        _good(clean / name / "0.png", 10 + index)
    argv = ["evaluate", str(checkpoint), "--data", str(clean), "--domain", f"night={bad}"]
    refused = run_cli(argv)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"error: domain 'night': 3 images in {str(bad)!r} are corrupt or not images: "
        "a/junk.png, b/1.jpg, b/2.jpg; remove them or pass --skip-bad-images to leave them out\n",
    )
    done = run_cli([*argv, "--skip-bad-images", "--json"])
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"skipped 3 unreadable images in {bad}: a/junk.png, b/1.jpg, b/2.jpg\n"
    assert json.loads(done.stdout)["domain_images"] == {"night": 4}


@pytest.mark.parametrize("command", ["analyze", "search"])
def test_analyze_and_search_read_folders_by_the_same_rule(
    files, command: str, tmp_path: Path
) -> None:
    _checkpoint, data = files
    argv = {
        "analyze": ["analyze", "ibnify:digits_resnet", "--data", str(data), "--images", "4"],
        "search": [
            "search",
            "ibnify:digits_resnet",
            "--data",
            str(data),
            "--val-data",
            str(data),
            "--candidates",
            "a:1",
            "--epochs",
            "1",
            "--shift",
            "brightness_down",
            "--out",
            str(tmp_path / "search"),
        ],
    }[command]
    argv += ["--model-arg", "width=4", "--num-classes", "3", "--input-size", "16", "--json"]
    refused = run_cli(argv)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        f"error: 3 images in {str(data)!r} are corrupt or not images: a/junk.png, b/1.jpg, "
        "b/2.jpg; remove them or pass --skip-bad-images to leave them out\n"
    )
    done = run_cli([*argv, "--skip-bad-images"])
    assert done.returncode == 0, done.stderr
    line = f"skipped 3 unreadable images in {data}: a/junk.png, b/1.jpg, b/2.jpg"
    assert line in done.stderr.splitlines()
    assert "error" not in done.stderr
    assert json.loads(done.stdout)  # the report came out whole
