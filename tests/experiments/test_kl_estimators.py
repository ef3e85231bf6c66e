"""The KL-estimator experiment runs in --quick mode and shows its claims."""


import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_kl_estimators_quick(tmp_path):
    out, summary = run_quick("kl_estimators", tmp_path, timeout=300)
    assert (out / "kl_estimators.png").stat().st_size > 10_000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    assert summary["k1_unbiased"] and summary["k3_unbiased"]
    assert summary["k2_rel_bias_at_max_kl"] > 0.2  # k2 over-estimates at large KL
    assert summary["k3_over_k1_std_at_min_kl"] < 0.3  # k3 far less noisy near π_ref
    grads = summary["grad_rel_err_at_max_kl"]
    assert grads["k2"] < 1e-4  # k2 as a loss: exact reverse-KL gradient
    assert grads["k1"] > 0.99  # k1 as a loss: zero expected gradient
    assert grads["k3"] > 0.3 and summary["k3_grad_rel_err_vs_forward_kl"] < 1e-4  # k3: forward-KL gradient
