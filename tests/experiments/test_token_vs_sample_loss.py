"""Loss aggregation: the worked 200-token / 10-token example, a --quick LM run (mechanics
only) and the Part-B mechanism (length drift of wrong answers under seq_mean_token_mean)."""


import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_token_vs_sample_loss_quick(tmp_path):
    out, summary = run_quick("token_vs_sample_loss", tmp_path)
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
    # Part B (mechanism, tabular length policy, correctness independent of length, 8 seeds):
    # seq_mean_token_mean lets wrong responses grow long and right ones shrink; the other
    # two modes weigh tokens independently of their response's length, so length stays put.
    mech = summary["mechanism"]["modes"]
    initial = summary["mechanism"]["initial_length"]
    biased = mech["seq_mean_token_mean"]
    for mode in ("token_mean", "seq_mean_token_sum_norm"):
        assert biased["wrong_length_final"][0] > mech[mode]["wrong_length_final"][0] + 2.0
        assert min(biased["wrong_length_per_seed"]) > max(mech[mode]["wrong_length_per_seed"])
        assert biased["right_length_final"][0] < mech[mode]["right_length_final"][0] - 1.0
        assert abs(mech[mode]["wrong_length_final"][0] - initial) < 1.0
        assert abs(mech[mode]["right_length_final"][0] - initial) < 1.0
    assert biased["wrong_length_final"][0] > initial + 2.0
