"""Worked examples for math answer extraction, normalisation, equivalence and the reward."""

from __future__ import annotations

import pytest

from jaxrl_llm.rewards.math import (
    extract_answer,
    extract_boxed,
    extract_tag,
    gold_answer,
    math_accuracy_reward,
    math_equal,
    normalize_answer,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b}} + {c}}", r"\sqrt{\frac{a}{b}} + {c}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5$", "5"),
        (r"\boxed{ 3 }", "3"),
        (r"\boxed{unbalanced", None),
        (r"broken \boxed{ok} last \boxed{bad", "ok"),
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"Thus \boxed{\dfrac{3}{4}}.", r"\dfrac{3}{4}"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("so she has 1,000 left.\n#### 1,000", "1,000"),
        ("The answer is 42.", "42"),
        ("The answer is 42 apples.", "42"),
        ("The final answer is: 3.5", "3.5"),
        ("Answer: -7", "-7"),
        (r"The answer is $\frac{3}{4}$.", r"\frac{3}{4}"),
        ("so the answer is (1, 2).", "(1, 2)"),
        ("the answer is \\boxed{9} since", "9"),
        ("5 + 7 = 12", "12"),
        ("I got 3 apples and 4.5 pears", "4.5"),
        ("there are 1,234,567 stars and 2 moons. Total 1,234,569", "1,234,569"),
        (r"so x = \frac{1}{2}", r"\frac{1}{2}"),
        ("the value is -.5", "-.5"),
        ("<think>3 or 4</think> <answer>4</answer>", "4"),
        (r"<think>x</think><answer>so \boxed{8}</answer>", "8"),
        (r"<think>7</think><answer>\dfrac{1}{2}</answer>", r"\dfrac{1}{2}"),
        ("version v2 is great", None),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("$1,000$", "1000"),
        ("12,345.60", "12345.6"),
        ("1,2,3", "1,2,3"),
        (r"\dfrac{3}{4}", "3/4"),
        (r"\tfrac{3}{4}", "3/4"),
        (r"\frac12", "1/2"),
        (r"-\frac{1}{2}", "-1/2"),
        (r"\frac{a+b}{2}", "(a+b)/2"),
        (r"\frac{\frac{1}{2}}{3}", "(1/2)/3"),
        ("x = 2.50", "2.5"),
        ("3.0", "3"),
        ("3.00", "3"),
        ("+5", "5"),
        ("-0", "0"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("10.", "10"),
        (r"\text{(B)}", "(B)"),
        (r"\textbf{yes}", "yes"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"50\%", "50"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\$5", "5"),
        (r"\boxed{7}", "7"),
        (r"\(x^2\)", "x^2"),
        (r"3\,000", "3000"),
        ("{5}", "5"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("0.5", "1/2"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        ("$0.50$", "1/2"),
        ("1,000", "1000"),
        ("1000.0", "1000"),
        ("-3", r"-\frac{6}{2}"),
        ("x=4", "4"),
        ("(1, 2)", r"\left(1,2\right)"),
        (r"\text{B}", "B"),
        (r"2\sqrt{2}", r"2 \sqrt{2}"),
        ("25%", "25"),
    ],
)
def test_math_equal_true(pred, gold):
    assert math_equal(pred, gold)
    assert math_equal(gold, pred)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("0.333", "1/3"),
        ("2", "3"),
        ("1/0", "1/0.0"),
        ("12", "1,2"),
        ("(1,2)", "(2,1)"),
        ("", ""),
        (None, "1"),
        ("1", None),
        (r"\sqrt{8}", r"2\sqrt{2}"),  # symbolic equivalence is out of scope
        ("-0.5", "0.5"),
    ],
)
def test_math_equal_false(pred, gold):
    assert not math_equal(pred, gold)


def test_extract_tag():
    assert extract_tag("<answer> a </answer><answer>b</answer>") == "b"
    assert extract_tag("<think>x</think>", "think") == "x"
    assert extract_tag("<answer>open") is None


@pytest.mark.parametrize(
    "gold,expected",
    [
        ("42", "42"),
        ("He has 3 + 4 = 7 apples.\n#### 7", "7"),
        (r"so it is \boxed{\frac{1}{3}}", r"\frac{1}{3}"),
        (7, "7"),
        (0.5, "0.5"),
        (None, None),
        ("", None),
        ("   ", None),
        ("$$", None),
        ("#### ", None),
    ],
)
def test_gold_answer(gold, expected):
    assert gold_answer(gold) == expected


def test_math_accuracy_reward_worked_example():
    completions = [
        r"Half of 1 is \boxed{\frac{1}{2}}.",
        "The answer is 0.5",
        "I think it is 3.",
        "no idea",
        "#### 1,000",
        "the answer is 12",
        [{"role": "assistant", "content": r"\boxed{7}"}],
        "72",
    ]
    answers = ["0.5", "1/2", "4", "4", "1000", None, "7", "Natalia... #### 72"]
    rewards = math_accuracy_reward(["p"] * 8, completions, answer=answers)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0, None, 1.0, 1.0]
    assert len(rewards) == len(completions)


def test_math_accuracy_reward_requires_answer_column():
    with pytest.raises(ValueError, match="answer"):
        math_accuracy_reward(["p"], ["1"])
    with pytest.raises(ValueError, match="answer"):
        math_accuracy_reward(["p", "q"], ["1", "2"], answer=["1"])
    assert math_accuracy_reward([], [], answer=[]) == []
