"""Zero-variance groups: plain GRPO trains on them, dynamic sampling never does (at a
measured generation cost)."""


import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_zero_variance_groups_quick(tmp_path):
    out, summary = run_quick("zero_variance_groups", tmp_path)
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
