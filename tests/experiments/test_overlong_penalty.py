"""Soft overlong punishment keeps responses out of the penalty buffer and away from the cap."""


import pytest

from tests.experiments.helpers import run_quick


@pytest.mark.slow
def test_overlong_penalty_quick(tmp_path):
    out, summary = run_quick("overlong_penalty", tmp_path)
    assert (out / "overlong_penalty.png").stat().st_size > 10_000
    plain = summary["arms"]["no length penalty"]
    soft = summary["arms"][f"soft overlong punishment (buffer {summary['buffer']})"]
    # with the penalty: no held-out response cut at max_new_tokens, fewer in the buffer, shorter on average
    assert soft["held_out_truncated"] == 0.0
    assert soft["held_out_in_buffer_or_cut"] <= plain["held_out_in_buffer_or_cut"]
    assert soft["held_out_length"] < plain["held_out_length"] - 0.1
