"""Zero-variance groups: plain GRPO trains on them, dynamic sampling never does (at a
measured generation cost)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_zero_variance_groups_quick(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "zero_variance_groups.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=600)
    out = tmp_path / "zero_variance_groups"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "zero_variance_groups.png").stat().st_size > 10_000
    plain, ds = summary["arms"]["grpo"], summary["arms"]["grpo + dynamic sampling"]
    # plain GRPO: a sizeable share of its update batch carries no signal
    assert plain["zero_variance_in_update"] > 0.1
    assert plain["zero_variance_in_update"] == pytest.approx(plain["zero_variance_sampled"])
    # dynamic sampling: whenever B informative groups were found, none of the batch is degenerate
    assert summary["dynamic_sampling_filled_fraction"] > 0.5
    assert summary["dynamic_sampling_zero_variance_when_filled"] == 0.0
    # ... and it paid for that with extra generations
    assert plain["generation_cost_ratio"] == 1.0
    assert ds["generation_cost_ratio"] > 1.2
