"""The GRPO-variants experiment runs in --quick mode: five presets, same budget."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_grpo_variants_quick(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "grpo_variants.py"), "--quick", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    out = tmp_path / "grpo_variants"
    summary = json.loads((out / "summary.json").read_text())
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
