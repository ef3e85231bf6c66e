"""Tests for jaxrl_llm.rewards.combine: weighted sums, None propagation, failure safety."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxrl_llm.rewards import (
    combine_rewards,
    format_reward,
    math_accuracy_reward,
    safe_reward_fn,
)


def const(value, name="const"):
    def fn(prompts, completions, **columns):
        return [value] * len(completions)

    fn.__name__ = name
    return fn


def by_text(prompts, completions, **columns):
    """Scores from the completion text: a number, 'none' → None, 'nan' → NaN, 'boom' → raises."""
    out = []
    for c in completions:
        if c == "boom":
            raise RuntimeError("cannot score boom")
        out.append(None if c == "none" else float("nan") if c == "nan" else float(c))
    return out


def test_weighted_sum_matches_hand_computation():
    fn = combine_rewards([(by_text, 2.0), (const(0.5, "half"), -1.0), (const(1.0), 0.25)])
    got = fn(["p"] * 3, ["1", "0", "-2"])
    assert got == pytest.approx([2 * 1 - 0.5 + 0.25, 0 - 0.5 + 0.25, -4 - 0.5 + 0.25])
    assert fn.last_components == {"by_text": [1.0, 0.0, -2.0], "half": [0.5] * 3, "const": [1.0] * 3}
    assert fn.component_means() == pytest.approx({"reward/by_text": -1 / 3, "reward/half": 0.5, "reward/const": 1.0})
    assert len(got) == 3


def test_none_propagates_or_is_replaced():
    prop = combine_rewards([(by_text, 1.0), (const(1.0), 1.0)])
    assert prop([""] * 3, ["1", "none", "2"]) == [2.0, None, 3.0]
    filled = combine_rewards([(by_text, 1.0), (const(1.0), 1.0)], none_value=0.0)
    assert filled([""] * 3, ["1", "none", "2"]) == [2.0, 1.0, 3.0]


def test_columns_are_forwarded():
    fn = combine_rewards([(math_accuracy_reward, 1.0), (format_reward(r"\d+"), 0.5)])
    assert fn(["q", "q"], ["7", "x 8"], answer=["7", "8"]) == [1.5, 1.0]


def test_duplicate_names_are_disambiguated():
    fn = combine_rewards([(const(1.0), 1.0), (const(2.0), 1.0)])
    fn([""], ["a"])
    assert set(fn.last_components) == {"const", "const_2"}


@pytest.mark.parametrize(
    "components,match",
    [
        ([], "components"),
        ([(const(1.0), float("nan"))], "weight"),
        ([(const(1.0), "1")], "weight"),
        ([(1.0, const(1.0))], "components"),
    ],
)
def test_combine_bad_arguments(components, match):
    with pytest.raises(ValueError, match=match):
        combine_rewards(components)


def test_combine_checks_component_lengths():
    def short(prompts, completions, **columns):
        return [1.0]

    with pytest.raises(ValueError, match="short"):
        combine_rewards([(short, 1.0)])([""] * 2, ["a", "b"])


def test_safe_reward_isolates_exceptions_and_nan():
    safe = safe_reward_fn(by_text, default=0.0)
    completions = ["1", "boom", "nan", "none", "2.5", "inf"]
    got = safe(["p"] * 6, completions)
    assert got == [1.0, 0.0, 0.0, None, 2.5, 0.0]
    assert [(f.index, f.reason) for f in safe.last_failures] == [(1, "exception"), (2, "non_finite"), (5, "non_finite")]
    assert "cannot score boom" in safe.last_failures[0].message
    assert safe.failed_indices == [1, 2, 5]
    assert safe.__name__ == "by_text"
    # a clean call resets last_failures but keeps the running counts
    assert safe(["p"], ["3"]) == [3.0]
    assert safe.last_failures == []
    m = safe.metrics()
    assert m["reward/by_text/num_failed"] == 3
    assert m["reward/by_text/fail_rate"] == pytest.approx(3 / 7)
    assert m["reward/by_text/failed_exception"] == 1 and m["reward/by_text/failed_non_finite"] == 2


def test_safe_reward_default_none_and_columns_sliced():
    def needs_answer(prompts, completions, answer, **columns):
        assert len(answer) == len(completions)
        return [1.0 / float(a) for a in answer]  # ZeroDivisionError for "0"

    safe = safe_reward_fn(needs_answer)
    assert safe(["a", "b", "c"], ["x", "y", "z"], answer=["2", "0", "4"], scale=3) == [0.5, None, 0.25]
    assert safe.failed_indices == [1]


def test_safe_reward_bad_types_and_lengths():
    def weird(prompts, completions, **columns):
        return ["high" if c == "s" else np.float32(c) for c in completions]

    safe = safe_reward_fn(weird, default=-1.0)
    assert safe([""] * 3, ["1", "s", "2"]) == [1.0, -1.0, 2.0]
    assert [f.reason for f in safe.last_failures] == ["bad_type"]

    def always_two(prompts, completions, **columns):
        return [1.0, 1.0]

    safe2 = safe_reward_fn(always_two)
    assert safe2([""] * 3, ["a", "b", "c"]) == [None, None, None]
    assert {f.reason for f in safe2.last_failures} == {"bad_length"}


def test_safe_then_combine_never_nan():
    fn = combine_rewards([(safe_reward_fn(by_text, default=0.0), 1.0), (const(1.0), 1.0)])
    got = fn([""] * 4, ["1", "nan", "boom", "none"])
    assert got[:3] == [2.0, 1.0, 1.0] and got[3] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in got)


def test_safe_reward_bad_arguments():
    with pytest.raises(ValueError, match="fn"):
        safe_reward_fn(None)
    with pytest.raises(ValueError, match="default"):
        safe_reward_fn(by_text, default=float("nan"))
