"""Format rewards: full-match a regex, or partial credit for well-formed tags.

Both are factories returning a reward function in the TRL convention
``reward_fn(prompts, completions, **columns) -> list[float]`` (format rewards always score).

References:
  DeepSeek-AI 2025, DeepSeek-R1 (format reward), https://arxiv.org/abs/2501.12948
  Hugging Face Open-R1 ``tag_count_reward``, https://github.com/huggingface/open-r1
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jaxrl_llm.rewards._utils import RewardFn, completion_text

# R1-style reasoning format: a think block followed by an answer block.
THINK_ANSWER_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
THINK_ANSWER_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(
    pattern: str = THINK_ANSWER_PATTERN,
    *,
    flags: int = re.DOTALL,
    strip: bool = True,
    name: str = "format_reward",
) -> RewardFn:
    """Reward 1.0 for completions that fully match ``pattern``, else 0.0.

    Args:
      pattern: regular expression matched with ``re.fullmatch`` against the whole
        completion (default: ``<think>…</think> <answer>…</answer>``).
      flags: ``re`` flags; the default DOTALL lets ``.`` cross newlines.
      strip: strip surrounding whitespace from the completion before matching.
      name: ``__name__`` of the returned function (used as its metrics key).

    Returns:
      reward_fn(prompts, completions, **columns) -> list[float] in {0.0, 1.0}.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty regex string, got {pattern!r}")
    try:
        compiled = re.compile(pattern, flags)
    except re.error as err:
        raise ValueError(f"pattern is not a valid regex: {pattern!r} ({err})") from err

    def reward_fn(prompts: Sequence[str], completions: Sequence, **columns) -> list[float]:
        del prompts, columns
        out = []
        for completion in completions:
            text = completion_text(completion)
            text = text.strip() if strip else text
            out.append(1.0 if compiled.fullmatch(text) else 0.0)
        return out

    reward_fn.__name__ = name
    reward_fn.__doc__ = f"1.0 if the completion fully matches {pattern!r}, else 0.0."
    return reward_fn


def tag_count_reward(
    tags: Sequence[str] = THINK_ANSWER_TAGS,
    *,
    ordered: bool = True,
    name: str = "tag_count_reward",
) -> RewardFn:
    """Partial format credit: 1/len(tags) for each tag that appears exactly once.

    reward = (1 / K) · Σ_k [count(tag_k) == 1], and with ``ordered=True`` a tag only
    earns its credit if it also appears after the previous credited tag (so
    ``</answer><answer>`` earns less than ``<answer></answer>``). A dense shaping signal
    for small models that have not found the full format yet.

    Args:
      tags: K ≥ 1 non-empty literal tag strings, in their expected order.
      ordered: require the tags to appear in the given order.
      name: ``__name__`` of the returned function.

    Returns:
      reward_fn(prompts, completions, **columns) -> list[float] in [0, 1].
    """
    tags = tuple(tags)
    if not tags or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"tags must be a non-empty sequence of non-empty strings, got {tags!r}")

    def score(text: str) -> float:
        credit, last_pos = 0, -1
        for tag in tags:
            if text.count(tag) != 1:
                continue
            pos = text.find(tag)
            if ordered and pos <= last_pos:
                continue
            credit += 1
            last_pos = pos
        return credit / len(tags)

    def reward_fn(prompts: Sequence[str], completions: Sequence, **columns) -> list[float]:
        del prompts, columns
        return [score(completion_text(c)) for c in completions]

    reward_fn.__name__ = name
    return reward_fn
