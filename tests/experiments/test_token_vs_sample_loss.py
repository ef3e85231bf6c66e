"""Loss aggregation: the worked 200-token / 10-token example and a --quick training run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_token_vs_sample_loss_quick(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "token_vs_sample_loss.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=600)
    out = tmp_path / "token_vs_sample_loss"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "token_vs_sample_loss.png").stat().st_size > 10_000
    ex = summary["worked_example"]
    # seq_mean_token_mean: each response weighs 1/2, split over its own tokens
    assert ex["seq_mean_token_mean"]["long_200"] == pytest.approx(1 / 400, rel=1e-5)
    assert ex["seq_mean_token_mean"]["short_10"] == pytest.approx(1 / 20, rel=1e-5)
    # token_mean: every token of the batch weighs 1/210
    assert ex["token_mean"]["long_200"] == pytest.approx(1 / 210, rel=1e-5)
    assert ex["token_mean"]["short_10"] == pytest.approx(1 / 210, rel=1e-5)
    # seq_mean_token_sum_norm (constant 200): 1/(2·200) for every token, whatever its response's length
    assert ex["seq_mean_token_sum_norm"]["long_200"] == pytest.approx(1 / 400, rel=1e-5)
    assert ex["seq_mean_token_sum_norm"]["short_10"] == pytest.approx(1 / 400, rel=1e-5)
    assert set(summary["modes"]) == {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"}
    for mode in summary["modes"].values():
        assert 1.0 <= mode["length_last5"] <= 12.0
