"""The GRPO-variants experiment runs in --quick mode: five presets, same budget."""

import json
import math

import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_grpo_variants_quick(tmp_path):
    out, summary = run_quick("grpo_variants", tmp_path)
    assert (out / "grpo_variants.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * summary["steps"]
    presets = summary["presets"]
    assert set(presets) == {"grpo", "dr_grpo", "dapo", "gspo", "rloo"}
    for name, p in presets.items():
        assert p["all_finite"], name
        assert 0.0 <= p["held_out_greedy_mean"] <= 1.0 and math.isfinite(p["entropy_mean"])
        # same budget: one round of 16 prompts × 8 samples, except DAPO's dynamic sampling
        if name != "dapo":
            assert p["generations_per_step"] == 128
    assert presets["dapo"]["generations_per_step"] >= 128
