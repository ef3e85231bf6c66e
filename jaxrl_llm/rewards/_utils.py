"""Shared helpers for reward functions: the reward-function type, completion text, columns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# TRL convention: reward_fn(prompts, completions, **columns) -> one float (or None = could
# not score) per completion. Extra dataset columns (e.g. ``answer``) arrive as keyword lists.
RewardFn = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """The text of a completion: a str, or a conversational list of message dicts.

    For a conversation (``[{"role": "assistant", "content": "..."}]``, as TRL passes for
    chat datasets) the content of the last message is returned.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else str(content)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    raise TypeError(f"completion must be a str or a list of message dicts, got {type(completion).__name__}")


def column(name: str, values: Sequence[Any] | None, n: int) -> Sequence[Any]:
    """Check that a dataset column was passed and has one entry per completion."""
    if values is None:
        raise ValueError(f"reward function needs the dataset column `{name}` (one entry per completion)")
    if isinstance(values, (str, bytes)) or len(values) != n:
        raise ValueError(
            f"column `{name}` must be a list with one entry per completion ({n}), got "
            f"{type(values).__name__} of length {len(values)}"
        )
    return values


def reward_name(fn: Any) -> str:
    """A readable name for a reward function (for metrics keys and error messages)."""
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None)
    return name or type(fn).__name__
