"""Tests for the synthetic arithmetic task."""

from __future__ import annotations

import pytest

from jaxrl_llm.rewards.arithmetic import (
    arithmetic_reward,
    make_arithmetic_dataset,
    make_arithmetic_reward,
    parse_integer_answer,
)


def test_dataset_is_deterministic_and_correct():
    data = make_arithmetic_dataset(300, 7, max_operand=30, ops="+-*")
    assert data == make_arithmetic_dataset(300, 7, max_operand=30, ops="+-*")
    assert data != make_arithmetic_dataset(300, 8, max_operand=30, ops="+-*")
    seen_ops = set()
    for row in data:
        assert set(row) == {"prompt", "answer"}
        prompt = row["prompt"]
        assert prompt.endswith("=")
        # independent check: evaluate the expression with Python
        assert int(row["answer"]) == eval(prompt[:-1])  # noqa: S307 - digits and one operator
        op = next(c for c in prompt[1:] if c in "+-*")
        seen_ops.add(op)
        a, b = prompt[:-1].split(op)
        assert 0 <= int(a) <= 30 and 0 <= int(b) <= 30
        assert int(row["answer"]) >= 0
    assert seen_ops == {"+", "-", "*"}
    assert max(len(r["prompt"]) for r in data) <= 6


def test_dataset_negative_answers_allowed():
    data = make_arithmetic_dataset(200, 0, max_operand=9, ops="-", allow_negative=True)
    assert any(int(r["answer"]) < 0 for r in data)
    assert all(int(r["answer"]) == eval(r["prompt"][:-1]) for r in data)  # noqa: S307


def test_dataset_example_format():
    data = make_arithmetic_dataset(3, 0, max_operand=5, min_operand=5, ops="+")
    assert data == [{"prompt": "5+5=", "answer": "10"}] * 3
    assert make_arithmetic_dataset(0) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=-1), "n"),
        (dict(n=2, max_operand=-1), "max_operand"),
        (dict(n=2, min_operand=-1), "min_operand"),
        (dict(n=2, ops=""), "ops"),
        (dict(n=2, ops="+/"), "ops"),
        (dict(n=2, ops="++"), "ops"),
    ],
)
def test_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_arithmetic_dataset(**kwargs)


@pytest.mark.parametrize(
    "text,marker,expected",
    [
        ("19\n", "\n", 19),
        ("19", "\n", 19),
        (" 19 \nrest 20", "\n", 19),
        ("-3\n", "\n", -3),
        ("19a\n", "\n", None),
        ("1 9", "\n", None),
        ("", "\n", None),
        ("19<eos>junk", "<eos>", 19),
        ("19<eos>junk", None, None),
    ],
)
def test_parse_integer_answer(text, marker, expected):
    assert parse_integer_answer(text, marker) == expected


def test_arithmetic_reward():
    prompts = ["12+7=", "3-5=", "2*3=", "1+1=", "4+4="]
    completions = ["19\n", "-2\nmore", "7\n", "2", "8"]
    answers = ["19", "-2", "6", "2", None]
    assert arithmetic_reward(prompts, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]
    strict = make_arithmetic_reward("\n", require_end_marker=True)
    assert strict(prompts, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, None]
    with pytest.raises(ValueError, match="answer"):
        arithmetic_reward(prompts, completions)
    with pytest.raises(ValueError, match="end_marker"):
        make_arithmetic_reward("")


def test_reward_on_generated_data():
    data = make_arithmetic_dataset(50, 1)
    prompts = [d["prompt"] for d in data]
    answers = [d["answer"] for d in data]
    assert arithmetic_reward(prompts, [a + "\n" for a in answers], answer=answers) == [1.0] * 50
    wrong = [str(int(a) + 1) + "\n" for a in answers]
    assert arithmetic_reward(prompts, wrong, answer=answers) == [0.0] * 50
