"""MoE routing: without replay the training forward routes some tokens to other experts
than the rollout did; routing replay makes that fraction exactly 0."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_moe_routing_quick(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "moe_routing.py"), "--quick", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    out = tmp_path / "moe_routing"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "moe_routing.png").stat().st_size > 10_000
    arms = summary["arms"]
    assert arms["grpo + routing replay"]["routing_change_max"] == 0.0
    assert arms["grpo (no replay)"]["routing_change_mean"] > 0.002
    assert arms["gspo (no replay)"]["routing_change_mean"] > 0.002
    for name, arm in arms.items():
        assert arm["all_finite"], name
        assert math.isfinite(arm["ratio_mean"]) and abs(arm["ratio_mean"] - 1) < 0.2, name
    # GSPO's sequence-level clip range (3e-4, 4e-4) is far tighter: it clips much more often
    assert arms["gspo (no replay)"]["clipfrac_mean"] > arms["grpo (no replay)"]["clipfrac_mean"]
