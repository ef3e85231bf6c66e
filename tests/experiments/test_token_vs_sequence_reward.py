"""The token- vs sequence-level KL reward experiment runs in --quick mode and shows its claims."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_token_vs_sequence_reward_quick(tmp_path):
    run_quick("token_vs_sequence_reward", tmp_path)
    check_claims(tmp_path / "token_vs_sequence_reward")


def check_claims(out: Path) -> None:
    """The experiment's claims on one output folder (also usable on a full run's)."""
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "token_vs_sequence_reward.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["part"] for r in rows} == {"A", "B", "B_profile"}
    assert sum(r["part"] == "A" for r in rows) == 12  # 2 placements × 3 critics × 2 λ

    # A. Known ground truth. The placements are potential-based shaping of each other:
    a = summary["a"]
    diff = a["max_abs_adv_diff_token_vs_sequence"]
    for lam in ("0.95", "1.0"):
        assert diff[f"exact/lam{lam}"] < 1e-4  # a critic that knows the spent KL: identical advantages
        assert diff[f"blind/lam{lam}"] > 0.5  # one that does not: different advantages
        for critic in ("exact", "blind", "position"):  # ... but the same total reward (λ = 1 return)
            ret = a["return_first_token"]
            np.testing.assert_allclose(ret[f"token/{critic}/lam1.0"], ret[f"sequence/{critic}/lam1.0"], atol=1e-4)
    # token placement: every token gets all of its own KL, whatever the critic and λ
    for key, curve in a["curves"].items():
        if key.startswith("token/"):
            assert abs(np.mean(curve["kl_credit"]) - 1.0) < 0.1, key
    # sequence placement with a critic blind to the spent KL: token t gets λ^(T−1−t) of it
    assert a["blind_sequence_lam095_kl_credit_mean_dev_from_theory"] < 0.06
    assert a["kl_credit_t0"]["sequence/blind/lam0.95"] < 0.65  # theory 0.95^15 = 0.46
    assert a["kl_credit_t0"]["token/blind/lam0.95"] > 0.9  # theory 1
    # the score's credit at the decisive token k depends on the critic, not on the placement
    k_theory = 0.95 ** (summary["horizon"] - 1 - summary["decisive_position"])
    for placement in ("token", "sequence"):
        sc = a["score_credit"]
        assert abs(sc[f"{placement}/blind/lam0.95"] - 1.0) < 0.05  # the critic sees a_k: credited at once
        assert abs(sc[f"{placement}/position/lam0.95"] - k_theory) < 0.05  # it does not: λ^(T−1−k)
    # so a blind critic ranks actions worse under the sequence placement
    for lam in ("0.95", "1.0"):
        assert a["corr_mean"][f"token/blind/lam{lam}"] > a["corr_mean"][f"sequence/blind/lam{lam}"] + 0.05

    # B. Tiny PPO run: both placements learn the early-character reward (0..4)
    b = summary["b"]
    for placement in ("token", "sequence"):
        assert b[placement]["reward_last10"] > b[placement]["reward_first5"] + 2.0, placement
        assert all(np.isfinite(b[placement]["kl_by_pos"]))
    # the learned critic does not track the KL already spent (1 would be the exact critic) ...
    assert abs(b["sequence"]["critic_spent_kl_free"]) < 0.3
    # ... so under "sequence" the early free tokens get only part of their KL in Â, rising
    # with t like λ^(T−1−t), as in A. The level needs the full run's trained critic (5 seeds
    # × 200 steps: 0.59 vs theory 0.62, experiments/README.md); after the quick run's 80
    # steps it measured 0.37-0.59 depending on the XLA build's float rounding, so here the
    # shape is checked: well below the late free tokens' credit, and not above theory.
    theory = summary["b_kl_credit_free_first4_theory_blind"]
    assert b["sequence"]["kl_credit_free_first4"] < theory + 0.15
    assert b["sequence"]["kl_credit_free_last4"] > b["sequence"]["kl_credit_free_first4"] + 0.25
    assert b["token"]["kl_credit_free"] > 0.75  # ≈ 1 under "token"
    assert b["token"]["kl_credit_free"] > b["sequence"]["kl_credit_free_first4"] + 0.1
