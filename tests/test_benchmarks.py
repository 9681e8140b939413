"""The benchmark scripts' own arithmetic, on made-up timings and records (no timing here): the
adaptation-cost rows and the zoo report's counts, selection and order."""

from __future__ import annotations

from argparse import Namespace
from collections import Counter

from benchmarks import adapt_cost, zoo_sweep


def test_adapt_cost_rows_take_medians_of_per_round_ratios() -> None:
    """Per method: the median over rounds of its time over the same round's forward, the
    range of those ratios, the median ms per image, and the verdict against its target."""
    seconds = {
        "forward": [1.0, 2.0, 4.0],
        "bn": [1.2, 3.0, 4.4],  # ratios 1.2, 1.5, 1.1: median 1.2 <= 1.25
        "entropy (1 epoch)": [6.0, 10.0, 16.0],  # 6.0, 5.0, 4.0: median 5.0 <= 5.0
        "online": [4.0, 8.0, 12.0],  # 4.0, 4.0, 3.0: median 4.0 > 3.75
    }
    assert adapt_cost._rows(seconds, images=1000) == [
        "| bn | 3.000 | **1.20** (1.10-1.50) | ≤ 1.25: meets |",
        "| entropy (1 epoch) | 10.000 | **5.00** (4.00-6.00) | ≤ 5.00: meets |",
        "| online | 8.000 | **4.00** (3.00-4.00) | ≤ 3.75: MISSES |",
    ]


MODELS = [
    ("tv:a", "tv.resnet"),
    ("tv:b", "tv.resnet"),
    ("timm:c", "efficientnet"),
    ("timm:d", "efficientnet"),
    ("timm:e", "efficientnet"),
    ("timm:f", "vit"),
]
CACHE = {
    "tv:a": {"batchnorm": True, "params": 30},
    "tv:b": {"batchnorm": True, "params": 10},
    "timm:c": {"batchnorm": True, "params": 500},
    "timm:d": {"batchnorm": True, "params": 20},
    "timm:e": {"batchnorm": True, "params": 20},
    "timm:f": {"batchnorm": False, "params": 5},
}


def _args(**given: object) -> Namespace:
    defaults = {"source": "all", "families": None, "models": None, "limit": None}
    return Namespace(**{**defaults, "max_params": 100, **given})


def test_zoo_selection_and_todo_order() -> None:
    """``--source``/``--families``/``--models`` filter; the todo skips done, BN-less and too
    large models and runs small ones first (ties by name), at most ``--limit``."""
    assert zoo_sweep._selected(MODELS, _args(source="tv")) == MODELS[:2]
    assert zoo_sweep._selected(MODELS, _args(families="vit,tv.resnet")) == [
        *MODELS[:2],
        MODELS[5],
    ]
    assert zoo_sweep._selected(MODELS, _args(models="timm:d,tv:a")) == [MODELS[0], MODELS[3]]
    done = {"timm:d": {"status": "converted"}}
    assert zoo_sweep._todo(MODELS, CACHE, done, _args()) == ["tv:b", "timm:e", "tv:a"]
    assert zoo_sweep._todo(MODELS, CACHE, done, _args(limit=2)) == ["tv:b", "timm:e"]


def test_zoo_family_counts_and_rows() -> None:
    results = {
        "tv:a": {"model": "tv:a", "status": "converted", "convert_s": 0.5},
        "tv:b": {"model": "tv:b", "status": "refused", "reason": "no | pipes"},
        "timm:d": {"model": "timm:d", "status": "too_big"},
    }
    totals, rows, detail = zoo_sweep._family_counts(MODELS, CACHE, results, limit=100)
    assert totals == Counter(
        {"tried": 2, "converted": 1, "refused": 1, "too_big": 2, "not_run": 1, "no_bn": 1}
    )
    assert rows == [
        "| efficientnet | 3 | 0 | 2 | 1 | 0 | 0 | 0 | 0 | 0 |",
        "| tv.resnet | 2 | 0 | 0 | 0 | 2 | 1 | 1 | 0 | 0 |",
        "| vit | 1 | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 0 |",
    ]
    assert detail == {
        "tv.resnet": [
            "| tv:a | converted |  |  |  |  | 0.5 |  |",
            "| tv:b | refused |  |  |  |  |  | no / pipes |",
        ]
    }
