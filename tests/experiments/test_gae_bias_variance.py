"""The GAE bias/variance experiment runs in --quick mode and shows its claims."""


import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_gae_bias_variance_quick(tmp_path):
    out, summary = run_quick("gae_bias_variance", tmp_path, timeout=300)
    assert (out / "gae_bias_variance.png").stat().st_size > 10_000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(summary["lambdas"]) == 5
    assert summary["bias_decreases_with_lambda"]  # critic error leaks in less as λ → 1
    assert summary["variance_increases_with_lambda"]  # sampled returns add variance as λ → 1
    assert summary["lam1_unbiased"]  # λ = 1: signed bias within 3 standard errors of 0
    assert summary["chi2_per_dof_lam1"] < 1.5  # ... and no (h, s, a) cell is biased either
    assert summary["bias_mean_lam0_z"] > 20 and summary["chi2_per_dof_lam0"] > 20  # λ = 0 clearly biased
    assert summary["variance_ratio_lam1_over_lam0"] > 3
