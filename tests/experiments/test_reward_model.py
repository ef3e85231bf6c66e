"""The reward-model experiment runs in --quick mode and shows its claims."""

import json

import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_reward_model_quick(tmp_path):
    out, summary = run_quick("reward_model", tmp_path)
    assert (out / "reward_model.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["part"] for r in rows} == {"size", "ties", "length"}

    # 1. more comparisons → better agreement with gold, for both losses; all methods end close
    assert summary["bt_acc_increases_with_size"] and summary["pl_acc_increases_with_size"]
    final = [accs[-1] for accs in summary["size_acc"].values()]
    assert min(final) > 0.85 and max(final) - min(final) < 0.05
    assert all(auc[-1] > 0.95 for auc in summary["size_auc"].values())

    # 2. ties: ~30% of pairs; dropping or keeping them at ½ both stay close to forced choice
    ties = summary["ties"]
    assert all(0.25 < f < 0.35 for f in ties["tie_fraction"])
    for key in ("ties_dropped", "ties_half_label"):
        assert all(abs(a - b) < 0.05 for a, b in zip(ties[key], ties["forced_choice"]))

    # 3. length-biased labels: the plain RM likes length although gold does not
    length = summary["length"]
    assert abs(length["gold_corr_length"]) < 0.05
    assert summary["plain_corr_length"] > 0.3 and length["plain"]["longer_wins"] > 0.58
    # regressing length out / a length head with a decorrelation penalty remove it and
    # recover the accuracy of an RM trained on unbiased labels
    for fix in ("regress_out_length", "length_head_decorrelation"):
        assert abs(length[fix]["corr_length"]) < 0.05
        assert length[fix]["acc"] > length["plain"]["acc"] + 0.05
        assert length[fix]["acc"] > length["unbiased_labels"]["acc"] - 0.02
    # dropping the length input is not enough: length leaks through correlated features
    assert summary["drop_feature_corr_length"] > 0.08
