"""A synthetic verifiable task for tiny offline experiments: integer arithmetic.

Prompts are short expressions such as ``"12+7="`` with the exact integer answer
``"19"`` as the ``answer`` column; the reward is 1.0 when the completion, up to an end
marker, is exactly that integer. Prompts and answers are a few characters long, so a
character-level model trained from scratch can learn the task in minutes on a CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from jaxrl_llm.rewards._utils import RewardFn, column, completion_text

ARITHMETIC_OPS = "+-*"
DEFAULT_END_MARKER = "\n"
_INT_RE = re.compile(r"[-+]?\d+")


def make_arithmetic_dataset(
    n: int,
    rng_seed: int = 0,
    *,
    max_operand: int = 20,
    min_operand: int = 0,
    ops: str = "+-",
    allow_negative: bool = False,
) -> list[dict[str, str]]:
    """n random problems ``{"prompt": "a<op>b=", "answer": str(a <op> b)}``.

    Operands are uniform integers in [min_operand, max_operand] and the operator is
    uniform over ``ops``. With ``allow_negative=False`` the operands of "-" are ordered
    so that the answer is ≥ 0. Deterministic given ``rng_seed``.

    Args:
      n: number of problems (≥ 0).
      rng_seed: seed for ``numpy.random.default_rng``.
      max_operand, min_operand: inclusive operand range, 0 ≤ min_operand ≤ max_operand.
      ops: non-empty string of distinct characters from "+-*".
      allow_negative: allow negative answers for "-".

    Returns:
      list of n dicts with str fields "prompt" and "answer".
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(min_operand, int) or min_operand < 0:
        raise ValueError(f"min_operand must be an int >= 0, got {min_operand!r}")
    if not isinstance(max_operand, int) or max_operand < min_operand:
        raise ValueError(f"max_operand must be an int >= min_operand={min_operand}, got {max_operand!r}")
    if not ops or len(set(ops)) != len(ops) or any(op not in ARITHMETIC_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty string of distinct characters from {ARITHMETIC_OPS!r}, got {ops!r}")
    rng = np.random.default_rng(rng_seed)
    a = rng.integers(min_operand, max_operand + 1, size=n)
    b = rng.integers(min_operand, max_operand + 1, size=n)
    op_index = rng.integers(0, len(ops), size=n)
    data = []
    for x, y, k in zip(a.tolist(), b.tolist(), op_index.tolist()):
        op = ops[k]
        if op == "-" and not allow_negative and x < y:
            x, y = y, x
        value = x + y if op == "+" else x - y if op == "-" else x * y
        data.append({"prompt": f"{x}{op}{y}=", "answer": str(value)})
    return data


def parse_integer_answer(completion: str, end_marker: str | None = DEFAULT_END_MARKER) -> int | None:
    """The integer written before the first end marker, or None if it is not exactly one.

    The text up to the first ``end_marker`` (the whole text if the marker is absent or
    None), stripped of surrounding whitespace, must be an integer like "19" or "-3";
    anything else ("19a", "1 9", "") gives None.
    """
    text = completion if end_marker is None else completion.split(end_marker, 1)[0]
    text = text.strip()
    return int(text) if _INT_RE.fullmatch(text) else None


def make_arithmetic_reward(
    end_marker: str | None = DEFAULT_END_MARKER,
    *,
    require_end_marker: bool = False,
    name: str = "arithmetic_reward",
) -> RewardFn:
    """Reward function: 1.0 iff the completion's integer (before end_marker) is the answer.

    Args:
      end_marker: text that ends the answer (e.g. "\\n" or an EOS string); None uses the
        whole completion.
      require_end_marker: score 0.0 if the marker never appears (answer not finished).
      name: ``__name__`` of the returned function.

    Returns:
      reward_fn(prompts, completions, answer=[...], **columns) -> list[float | None];
      None where the gold answer is missing or not an integer.
    """
    if end_marker is not None and not end_marker:
        raise ValueError("end_marker must be None or a non-empty string")

    def reward_fn(
        prompts: Sequence[str], completions: Sequence, answer: Sequence[str] | None = None, **columns
    ) -> list[float | None]:
        del prompts, columns
        answer = column("answer", answer, len(completions))
        out: list[float | None] = []
        for completion, gold in zip(completions, answer):
            gold_value = parse_integer_answer(str(gold), None) if gold is not None else None
            if gold_value is None:
                out.append(None)
                continue
            text = completion_text(completion)
            if require_end_marker and end_marker is not None and end_marker not in text:
                out.append(0.0)
                continue
            out.append(1.0 if parse_integer_answer(text, end_marker) == gold_value else 0.0)
        return out

    reward_fn.__name__ = name
    return reward_fn


arithmetic_reward = make_arithmetic_reward()
arithmetic_reward.__doc__ = (
    "1.0 iff the completion up to the first newline is exactly the integer `answer` "
    "(``make_arithmetic_reward()`` with defaults); None if the gold answer is missing."
)
