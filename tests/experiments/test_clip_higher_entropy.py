"""Clip-higher experiment runs in --quick mode (Part A LM run + Part B bandit mechanism). At this scale the entropy effect is not
consistent across seeds (see experiments/README.md), so only the mechanics are checked:
clipping is active in both arms and every number is finite."""

import math

import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_clip_higher_entropy_quick(tmp_path):
    out, summary = run_quick("clip_higher_entropy", tmp_path)
    assert (out / "clip_higher_entropy.png").stat().st_size > 10_000
    arms = summary["arms"]
    assert set(arms) == {"symmetric 0.2/0.2", "clip-higher 0.2/0.28"}
    for arm in arms.values():
        assert arm["clipfrac_mean"] > 0.01  # μ = 4 inner updates: the clip is active
        assert math.isfinite(arm["entropy_mean"]) and arm["entropy_mean"] > 0
    assert math.isfinite(summary["entropy_gap_mean"])
    # Part B (tabular bandit, 16 paired seeds): the DAPO mechanism, clip-higher lets the
    # initially rare positive-advantage tokens grow faster. Entropy is not asserted: in the
    # bandit too its gap is small and not consistent across seeds (README, Part B).
    mech = summary["mechanism"]
    assert mech["good_mass_gap_positive_fraction"] >= 0.8
    assert mech["good_mass_gap_mean"] > 0.01
    assert math.isfinite(mech["entropy_gap_mean"])
