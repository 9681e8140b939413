"""Data sources: the digits set, image folders (labelled and not), one data-source resolver."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ibnify.data.digits import digits_data, load_digits_images
from ibnify.data.images import DataError, image_folder_data
from ibnify.data.sources import check_data_source, resolve_data_source
from ibnify.errors import InvalidOptionError
from ibnify.models.registry import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("ibnify:digits_resnet", width=4)[0]


def _write_images(folder: Path, count: int, size: int = 20, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_digits_split_is_stratified_in_range_and_seeded() -> None:
    train_x, train_y, _test_x, test_y = load_digits_images(size=16, seed=0)
    assert (len(train_y), len(test_y)) == (1198, 599)
    assert train_x.shape[1:] == (3, 16, 16) and float(train_x.min()) >= 0.0
    assert float(train_x.max()) <= 1.0
    # stratified: every class holds about a third of its images in the test split
    counts = torch.bincount(test_y, minlength=10) / torch.bincount(
        torch.cat([train_y, test_y]), minlength=10
    )
    assert torch.all((counts > 0.3) & (counts < 0.37))
    other = load_digits_images(size=16, seed=1)[3]
    assert not torch.equal(other, test_y)


def test_check_data_source_wants_exactly_one_known_source() -> None:
    check_data_source("some/dir", None)
    check_data_source(None, "digits")
    for data, dataset in ((None, None), ("dir", "digits")):
        with pytest.raises(InvalidOptionError, match="either `data=DIR` or `dataset=digits`"):
            check_data_source(data, dataset)
    with pytest.raises(InvalidOptionError, match="unknown dataset 'mnist'"):
        check_data_source(None, "mnist")


def test_resolve_data_source_gives_the_digits_split(model: torch.nn.Module) -> None:
    train = resolve_data_source(None, "digits", model, split="train")
    test = resolve_data_source(None, "digits", model, split="test")
    assert (len(train), len(test), train.num_classes) == (1198, 599, 10)
    assert torch.equal(test.dataset.tensors[1], digits_data("test").dataset.tensors[1])


def test_image_folder_labelled_and_unlabelled(tmp_path: Path, model: torch.nn.Module) -> None:
    _write_images(tmp_path / "labelled" / "cat", 3)
    _write_images(tmp_path / "labelled" / "dog", 2, seed=1)
    data = resolve_data_source(tmp_path / "labelled", None, model, split="test")
    assert data.labelled and data.num_classes == 2 and len(data) == 5
    image, label = data.dataset[4]
    assert label == 1 and image.shape == (3, 16, 16)  # the model's data config: 16 px
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0  # not normalised

    _write_images(tmp_path / "flat", 4)
    flat = image_folder_data(tmp_path / "flat", model)
    assert not flat.labelled and len(flat) == 4 and flat.dataset[0][1] == -1


def test_bad_folders_raise_data_errors_naming_the_path(
    tmp_path: Path, model: torch.nn.Module
) -> None:
    with pytest.raises(DataError, match="does not exist"):
        image_folder_data(tmp_path / "missing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        image_folder_data(tmp_path / "empty", model)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    # found when the folder is read, not when a batch first reaches the file
    with pytest.raises(
        DataError, match=r"1 image in .*/bad' is corrupt or not an image: a/x\.png;"
    ):
        image_folder_data(tmp_path / "bad", model)
