"""Model sources, safe weight loading, the authors' checkpoint formats, save/load round trips."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

import ibnify
from ibnify.api import convert_named
from ibnify.core import IBN, Recipe, get_plan, get_recipe
from ibnify.errors import CheckpointError, ModelNotFoundError, WeightsError
from ibnify.models.registry import build_model, resolve_name
from ibnify.models.weights import clean_state_dict, load_state_dict_file
from tests.helpers import ResidualBlock, randomize_norms
from tests.reference_ibn import resnet_ibn

SMALL = (3, 64, 64)


def test_resolve_name_prefers_torchvision_then_timm() -> None:
    assert resolve_name("resnet50") == "tv:resnet50"
    assert resolve_name("timm:resnet50") == "timm:resnet50"
    assert resolve_name("seresnext50_32x4d") == "timm:seresnext50_32x4d"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet5O", r"unknown model 'resnet5O'; did you mean .*resnet50"),
        ("tv:seresnext50_32x4d", r"unknown model 'tv:seresnext50_32x4d'"),
        ("hub:resnet50", r"unknown model source 'hub'.*valid sources: tv:, timm:"),
    ],
)
def test_unknown_names_suggest(name: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_name(name)


def test_suggestions_name_a_model_once_although_both_libraries_have_it() -> None:
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_name("resnet5000")  # resnet50 exists in torchvision and in timm
    suggested = str(raised.value).split("did you mean ")[1].rstrip("?").split(", ")
    assert suggested[0] == "resnet50" and len(suggested) == len(set(suggested)) == 3


def test_clean_state_dict_unwraps_and_strips_prefixes() -> None:
    tensor = torch.zeros(1)
    wrapped = {"state_dict": {"module.conv1.weight": tensor, "module._orig_mod.fc.bias": tensor}}
    assert list(clean_state_dict(wrapped)) == ["conv1.weight", "fc.bias"]
    with pytest.raises(WeightsError, match="not plain weights: entry 'epoch' is a int"):
        clean_state_dict({"conv1.weight": tensor, "epoch": 3})


def _authors_checkpoint(tmp_path: Path, layout: str, wrapped: bool) -> tuple[Path, torch.nn.Module]:
    reference = resnet_ibn(50, layout)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    state = reference.state_dict()
    if wrapped:  # the older release format: DataParallel prefixes inside {"state_dict": ...}
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / f"resnet50_ibn_{layout}.pth"
    torch.save(state, path)
    return path, reference.eval()


@pytest.mark.parametrize(("layout", "wrapped"), [("a", False), ("a", True), ("b", True)])
def test_authors_checkpoints_load_strict_and_compute_the_same(tmp_path, layout, wrapped) -> None:
    path, reference = _authors_checkpoint(tmp_path, layout, wrapped)
    converted = convert_named("resnet50", layout=layout, weights=path, input_size=SMALL)
    converted.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), atol=1e-5, rtol=1e-5)


def test_plain_weights_load_before_conversion(tmp_path) -> None:
    original = torchvision.models.resnet18()
    path = tmp_path / "r18.safetensors"
    from safetensors.torch import save_file

    save_file(original.state_dict(), str(path))
    converted = convert_named("resnet18", weights=path, input_size=SMALL)
    bn = original.layer1[0].bn1
    torch.testing.assert_close(converted.layer1[0].bn1.BN.running_var, bn.running_var[32:])
    torch.testing.assert_close(converted.fc.weight, original.fc.weight)


def test_weights_of_another_architecture_are_summarised(tmp_path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(WeightsError, match=r"do not fit tv:resnet18: \d+ unexpected \(layer1\.2"):
        convert_named("resnet18", weights=path, input_size=SMALL)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(WeightsError, match=r"refusing to load .*weights_only=True"):
        load_state_dict_file(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(WeightsError):
        load_state_dict_file(raw)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"\x00\x01garbage" * 10, "corrupt or truncated|not a valid checkpoint"),
    ],
)
def test_bad_weight_files(tmp_path, content, message) -> None:
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        load_state_dict_file(path)


def test_truncated_safetensors_is_reported(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_state_dict_file(path)


def test_save_load_round_trip_rebuilds_from_the_file_alone(tmp_path) -> None:
    converted = ibnify.convert("resnet18", layout="b", input_size=SMALL).eval()
    path = tmp_path / "model.safetensors"
    ibnify.save(converted, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp left
    recipe = ibnify.read_recipe(path)
    assert recipe.source == "tv:resnet18" and recipe.layout == "resnet-b"
    assert recipe.stages == [1, 2] and recipe.ibnify_version == ibnify.__version__
    loaded = ibnify.load(path).eval()
    assert get_plan(loaded) == get_plan(converted)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), atol=0, rtol=0)


def test_model_kwargs_are_part_of_the_recipe(tmp_path) -> None:
    converted = ibnify.convert("resnet18", model_kwargs={"num_classes": 7}, input_size=SMALL)
    path = tmp_path / "m.safetensors"
    ibnify.save(converted, path)
    assert ibnify.read_recipe(path).model_kwargs == {"num_classes": 7}
    assert ibnify.load(path).fc.out_features == 7


def _digits_model(seed: int) -> torch.nn.Module:
    """A small unconverted model with non-trivial norms (a broken round trip shows)."""
    torch.manual_seed(seed)
    model, _ = build_model("ibnify:digits_resnet", num_classes=7)
    return randomize_norms(model, seed)


def test_an_unconverted_model_saves_with_no_plan_and_loads_unchanged(tmp_path) -> None:
    """Issue 23: a model with no plan saves without a fake one; load rebuilds it by name and
    applies nothing; the model passed in is untouched (no recipe attached, mode kept)."""
    model = _digits_model(3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = ibnify.save(
        model,
        tmp_path / "plain.safetensors",
        source="ibnify:digits_resnet",
        model_kwargs={"num_classes": 7},
    )
    recipe = ibnify.read_recipe(path)
    assert recipe.plans == () and recipe.plan is None
    assert (recipe.source, recipe.model_kwargs, recipe.num_classes) == (
        "ibnify:digits_resnet",
        {"num_classes": 7},
        7,
    )
    assert (recipe.layout, recipe.stages, recipe.sites, recipe.conversions()) == (
        "",
        [],
        0,
        "no conversion",
    )
    assert get_recipe(model) is None and model.training
    loaded = ibnify.load(path)
    assert list(loaded.state_dict()) == list(model.state_dict())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(isinstance(m, IBN) for m in loaded.modules())
    assert get_recipe(loaded).plans == ()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # converted later, the plan is the first one, the source the recorded one
    again = ibnify.convert(loaded, stages=(1,))
    assert len(get_recipe(again).plans) == 1 and get_recipe(again).source == recipe.source
    assert ibnify.read_recipe(ibnify.save(again, tmp_path / "ibn.safetensors")).stages == [1]


def test_an_unconverted_model_the_source_does_not_build_is_refused(tmp_path) -> None:
    model = _digits_model(1)  # 7 classes; the source's default builds 10
    with pytest.raises(CheckpointError, match=r"is not this model \(2 wrong shape"):
        ibnify.save(model, tmp_path / "x.safetensors", source="ibnify:digits_resnet")
    assert list(tmp_path.iterdir()) == []


def test_an_unconverted_instance_of_an_own_class_loads_with_its_base(tmp_path) -> None:
    """No source: the file records the class, as for a converted instance, and loads with
    ``base=`` (a copy is filled; the given base is left as it was)."""
    model = randomize_norms(ResidualBlock(4), 5).eval()
    path = ibnify.save(model, tmp_path / "own.safetensors")
    recipe = ibnify.read_recipe(path)
    assert (recipe.plans, recipe.source, recipe.base_class) == (
        (),
        None,
        "tests.helpers.ResidualBlock",
    )
    with pytest.raises(CheckpointError, match=r"ibnify.load\(path, base=ResidualBlock\("):
        ibnify.load(path)
    base = ResidualBlock(4)
    fresh = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = ibnify.load(path, base=base).eval()
    assert all(torch.equal(v, fresh[k]) for k, v in base.state_dict().items())
    x = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_recipe_from_dict_reads_an_empty_plan_list_and_refuses_a_malformed_one() -> None:
    record = Recipe(source="tv:resnet18", num_classes=1000).to_dict()
    assert record["plans"] == []
    assert Recipe.from_dict(record).plans == ()
    with pytest.raises(CheckpointError, match=r"damaged ibnify recipe \(no list of at most 16"):
        Recipe.from_dict({**record, "plans": None})
    with pytest.raises(CheckpointError, match=r"damaged ibnify recipe \(no list of at most 16"):
        Recipe.from_dict({**record, "plans": [record] * 17})
    legacy = {**record, "format": "ibnify.checkpoint/1"}
    del legacy["plans"]  # format 1 always held one plan: none is a damaged file
    with pytest.raises(CheckpointError, match=r"\(a plan is not a JSON object\)"):
        Recipe.from_dict(legacy)


def test_load_rejects_plain_weights_and_damaged_recipes(tmp_path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="holds no ibnify recipe"):
        ibnify.load(plain)
    damaged = tmp_path / "damaged.safetensors"
    save_file({"a": torch.zeros(1)}, str(damaged), metadata={"ibnify_recipe": json.dumps({})})
    with pytest.raises(CheckpointError, match="damaged ibnify recipe"):
        ibnify.load(damaged)


def test_pretrained_offline_fails_with_one_line() -> None:
    with pytest.raises(WeightsError, match=r"could not download pretrained.*`weights=FILE`"):
        convert_named("resnet18", pretrained=True, input_size=SMALL)


def test_random_bytes_always_end_in_weights_error(tmp_path, recwarn) -> None:
    """Garbage once crashed torch's weights-only unpickler with IndexError/KeyError (about one
    file in fifteen) and warned about odd pickle protocols; every one must be a WeightsError."""
    import random

    rng = random.Random(0)
    path = tmp_path / "random.pth"
    kinds = set()
    for _ in range(150):
        path.write_bytes(rng.randbytes(4096))
        with pytest.raises(WeightsError, match="is corrupt or truncated") as raised:
            load_state_dict_file(path)
        kinds.add(type(raised.value.__cause__).__name__)
    assert {"IndexError", "KeyError"} & kinds  # the crashing kinds did occur
    assert [str(w.message) for w in recwarn if "pickle protocol" in str(w.message)] == []
