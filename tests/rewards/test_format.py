"""Tests for jaxrl_llm.rewards.format."""

from __future__ import annotations

import re

import pytest

from jaxrl_llm.rewards.format import format_reward, tag_count_reward


def test_format_reward_default_think_answer():
    fn = format_reward()
    completions = [
        "<think>a\nb</think>\n<answer>42</answer>",
        "  <think>x</think><answer>y</answer>\n",  # surrounding whitespace is stripped
        "<think>x</think><answer>y</answer> trailing",
        "<answer>y</answer><think>x</think>",
        "<think>x</think>",
        "",
        [{"role": "assistant", "content": "<think></think> <answer></answer>"}],
    ]
    assert fn(["p"] * 7, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert fn.__name__ == "format_reward"


def test_format_reward_custom_pattern_and_strip():
    fn = format_reward(r"\d+", strip=False, name="digits")
    assert fn([], ["123", " 123", "12a", ""]) == [1.0, 0.0, 0.0, 0.0]
    assert fn.__name__ == "digits"
    case = format_reward(r"yes", flags=re.IGNORECASE)
    assert case([], ["YES", "yes!"]) == [1.0, 0.0]


@pytest.mark.parametrize("pattern", ["", "(unclosed", None])
def test_format_reward_bad_pattern(pattern):
    with pytest.raises(ValueError, match="pattern"):
        format_reward(pattern)


def test_tag_count_reward_partial_credit():
    fn = tag_count_reward()
    completions = [
        "<think>x</think><answer>y</answer>",  # all four once, in order
        "<think>x</think>",  # two of four
        "<think><think>x</think><answer>y</answer>",  # <think> twice: 3/4
        "</answer><answer>",  # out of order: only <answer> counts
        "plain text",
    ]
    assert fn([], completions) == [1.0, 0.5, 0.75, 0.25, 0.0]
    unordered = tag_count_reward(ordered=False)
    assert unordered([], ["</answer><answer>"]) == [0.5]


def test_tag_count_reward_custom_tags_and_errors():
    fn = tag_count_reward(("[A]", "[B]", "[C]"))
    assert fn([], ["[A][B]", "[C]"]) == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="tags"):
        tag_count_reward(())
    with pytest.raises(ValueError, match="tags"):
        tag_count_reward(("<a>", ""))
