"""Write the golden plan files that pin the converter's behaviour across refactors.

    python tests/golden/make_golden.py            # rewrite every golden file (review the diff!)
    python tests/golden/make_golden.py --plans    # rewrite only the seven plan files

The plans are those of the zoo below, built with random weights; ``tests/test_golden.py`` checks
that today's code writes the same bytes. ``zoo_sample_sites.json`` holds the converted sites of a
40-model sample of ``benchmarks/zoo_results.jsonl`` (every 19th converted model).
``v1/`` keeps the plan files as they were before reasons became records (sentences), for the
test that the regenerated files carry the same sites and the same reason codes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

# name → (model, layout, input size or None)
GOLDEN_PLANS = {
    "resnet50_a": ("tv:resnet50", "a", None),
    "resnet50_b": ("tv:resnet50", "b", None),
    "densenet121_a": ("tv:densenet121", "a", None),
    "efficientnet_b0_a": ("timm:efficientnet_b0", "a", None),
    "mobilenet_v3_large_a": ("tv:mobilenet_v3_large", "a", None),
    "regnety_016_a": ("timm:regnety_016", "a", None),
    "cspresnet50_a": ("timm:cspresnet50", "a", None),
}
SAMPLE_FILE = HERE / "zoo_sample_sites.json"
V1_DIR = HERE / "v1"
SAMPLE_SIZE = 40


def golden_plan_json(model: str, layout: str, input_size: int | None) -> str:
    """The plan JSON for one golden entry, exactly as the files hold it."""
    import ibnify
    from ibnify.models.registry import build_model

    module, source = build_model(model)
    size = None if input_size is None else (3, input_size, input_size)
    plan = ibnify.plan(module, layout=layout, input_size=size, arch=source)
    return plan.to_json() + "\n"


def zoo_sample() -> list[tuple[str, int]]:
    """(model, input size) of the sample: every k-th converted model of the zoo sweep."""
    rows = [
        json.loads(line)
        for line in (ROOT / "benchmarks" / "zoo_results.jsonl").read_text().splitlines()
        if line.strip()
    ]
    converted = [r for r in rows if r.get("status") == "converted"]
    step = max(1, len(converted) // SAMPLE_SIZE)
    return [(r["model"], int(r["input"])) for r in converted[::step][:SAMPLE_SIZE]]


def sample_sites(model: str, size: int) -> list[str]:
    """Names of the sites ibnify.plan picks for ``model`` (default layout and stages)."""
    import ibnify
    from ibnify.models.registry import build_model

    module, source = build_model(model)
    plan = ibnify.plan(module, input_size=(3, size, size), arch=source)
    return [f"{site.name}:{site.kind}:{site.stage}:{site.in_channels}" for site in plan.sites]


def main(plans_only: bool = False) -> None:
    import torch

    torch.manual_seed(0)
    for name, (model, layout, size) in GOLDEN_PLANS.items():
        (HERE / f"plan_{name}.json").write_text(golden_plan_json(model, layout, size))
        print("wrote", name)
    if plans_only:
        return
    sample = {}
    for model, size in zoo_sample():
        sample[model] = {"input": size, "sites": sample_sites(model, size)}
        print(model, len(sample[model]["sites"]))
    SAMPLE_FILE.write_text(json.dumps(sample, indent=1) + "\n")


if __name__ == "__main__":
    main(plans_only="--plans" in sys.argv[1:])
