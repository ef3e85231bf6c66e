"""Scoring sampled completions with the user's reward functions, and watching their health.

Every RL trainer (GRPO family, PPO, RFT) scores a rollout the same way:

- the reward function gets TRL's arguments: ``prompts`` as the records hold them (a
  string, or the message list of a conversational prompt) and ``completions`` as text,
  or, when the prompt is conversational, as ``[{"role": "assistant", "content": text}]``;
  every other record column arrives as a keyword list, one entry per completion;
- each function is wrapped by ``safe_reward_fn``: an exception or NaN costs only the
  failing samples their score (a weighted list of functions is wrapped per function, so
  a failure names the function that failed);
- a sample is *unscored* when a function failed on it, or when it got no score (None;
  in a weighted list a None only leaves that function out of the sum). More than
  ``max_unscored_frac`` unscored samples in one scoring call stops training with
  ``RewardHealthError`` (naming the function, the columns it received and its first
  error): a reward that cannot score the data trains on nothing, silently. A lower rate
  is logged as ``reward_unscored_frac``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_llm.rewards.combine import CombinedReward, combine_rewards, safe_reward_fn


class RewardHealthError(ValueError):
    """Too many samples of one scoring call could not be scored."""


def validate_reward_fields(reward_funcs: Sequence[str], reward_weights: Sequence[float] | None,
                           max_unscored_frac: float) -> None:
    """Checks the reward fields shared by the GRPO, PPO and RFT configs."""
    if not all(isinstance(f, str) and f for f in reward_funcs):
        raise ValueError(f"reward_funcs must be reward specs (strings), got {list(reward_funcs)}")
    if reward_weights is not None:
        n = len(reward_funcs)
        if n and len(reward_weights) != n:
            raise ValueError(f"reward_weights has {len(reward_weights)} values for {n} reward_funcs")
        if not all(np.isfinite(w) for w in reward_weights):
            raise ValueError(f"reward_weights must be finite, got {list(reward_weights)}")
    if not 0.0 <= max_unscored_frac <= 1.0:
        raise ValueError(f"max_unscored_frac must be in [0, 1] (1 turns the check off), got {max_unscored_frac}")


def resolve_reward(reward_fn: Any, config: Any, required: bool = True) -> Any:
    """The reward a trainer calls: ``reward_fn`` (a function or a list of functions /
    specs) or else the config's ``reward_funcs``, weighted by ``config.reward_weights``.
    Returns None when neither is given and ``required`` is False."""
    from jaxrl_llm.rewards.registry import build_reward

    if reward_fn is not None and config.reward_funcs:
        raise ValueError("give the reward either as reward_fn or as config.reward_funcs, not both")
    source = reward_fn if reward_fn is not None else config.reward_funcs
    if source is None or (not callable(source) and len(source) == 0):
        if required:
            raise ValueError("no reward: pass reward_fn= (a function or list of functions) or set "
                             "config.reward_funcs (e.g. ['math', 'my_rewards.py:length_reward'])")
        return None
    return build_reward(source, config.reward_weights)


def _expand(values: Sequence[Any], repeats: int) -> list:
    return [v for v in values for _ in range(repeats)]


def reward_inputs(raw_prompts: Sequence[Any], completions: Sequence[str], repeats: int) -> tuple[list, list]:
    """(prompts, completions) as a reward function receives them: each prompt repeated
    ``repeats`` times; conversational completions as one assistant message."""
    prompts = _expand(raw_prompts, repeats)
    wrapped = [c if isinstance(p, str) else [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
    return prompts, wrapped


class RewardScorer:
    """Calls the reward on decoded completions, tracks unscored samples, enforces health.

    Args:
      reward_fn: a reward function (a ``CombinedReward`` is wrapped per component).
      default: score for samples a function failed on (None: unscored).
      max_unscored_frac: stop when a call leaves more than this fraction unscored.
      workers: threads per function that score slices of a call concurrently (a slow
        verifier off the critical path, see ``SafeRewardFn``).
    """

    def __init__(self, reward_fn: Any, *, default: float | None = None, max_unscored_frac: float = 0.5,
                 workers: int = 1):
        if isinstance(reward_fn, CombinedReward):
            self.parts = [safe_reward_fn(fn, default=default, workers=workers) for _, fn, _ in reward_fn.components]
            self.fn = combine_rewards([(p, w) for p, (_, _, w) in zip(self.parts, reward_fn.components)],
                                      none_value=reward_fn.none_value, skip_none=reward_fn.skip_none)
        else:
            self.fn = safe_reward_fn(reward_fn, default=default, workers=workers)
            self.parts = [self.fn]
        self.max_unscored_frac = max_unscored_frac
        self._scored = self._total = 0
        self._component_sums: dict[str, list[float]] = {}

    def __call__(self, raw_prompts: Sequence[Any], completions: Sequence[str], columns: dict[str, Sequence[Any]],
                 repeats: int) -> np.ndarray:
        """[N] float64 scores (NaN where unscored) for N = len(raw_prompts) · repeats
        completions, grouped by prompt."""
        prompts, wrapped = reward_inputs(raw_prompts, completions, repeats)
        expanded = {k: _expand(v, repeats) for k, v in columns.items()}
        raw = self.fn(prompts, wrapped, **expanded)
        scores = np.array([np.nan if r is None else float(r) for r in raw], np.float64)
        unscored = self._unscored(raw)
        self._check_health(int(unscored.sum()), len(raw), sorted(columns))
        self._scored += int((~unscored).sum())
        self._total += len(raw)
        if isinstance(self.fn, CombinedReward):
            for name, values in self.fn.last_components.items():
                done = [float(v) for v in values if v is not None]
                acc = self._component_sums.setdefault(name, [0.0, 0.0])
                acc[0] += sum(done)
                acc[1] += len(done)
        return scores

    def _unscored(self, raw: list) -> np.ndarray:
        """[N] bool: the reward is None, or some function failed on the sample (a failing
        component counts even where the others still give a sum: it must not vanish
        from the reward in silence)."""
        out = np.array([r is None for r in raw])
        for part in self.parts:
            out[part.failed_indices] = True
        return out

    def _check_health(self, unscored: int, n: int, columns: list[str]) -> None:
        if n == 0 or unscored / n <= self.max_unscored_frac:
            return
        lines = [f"the reward could not score {unscored} of {n} samples (more than max_unscored_frac="
                 f"{self.max_unscored_frac}); training would learn from nothing."]
        for part in self.parts:
            call = f"{part.__name__}(prompts, completions{''.join(', ' + c + '=[...]' for c in columns)})"
            if part.last_failures:
                first = part.last_failures[0]
                lines.append(f"  {call} failed on {len(part.last_failures)} samples; first (sample {first.index}, "
                             f"{first.reason}): {first.message}")
            else:
                lines.append(f"  {call} raised nothing (a None return means 'could not score')")
        lines.append(f"  dataset columns passed as keywords: {columns or 'none'}. Rename a column with "
                     "load_records(columns={'old': 'new'}), or set max_unscored_frac=1.0 to train anyway.")
        raise RewardHealthError("\n".join(lines))

    def step_metrics(self) -> dict[str, float]:
        """Since the previous call: ``reward_unscored_frac`` and, for several functions, the
        mean of each one's scored values (``reward/<name>``); then resets."""
        out = {"reward_unscored_frac": 1.0 - self._scored / self._total if self._total else 0.0}
        out.update({f"reward/{name}": s / c if c else float("nan") for name, (s, c) in self._component_sums.items()})
        self._scored = self._total = 0
        self._component_sums = {}
        return out


__all__ = ["RewardHealthError", "RewardScorer", "resolve_reward", "reward_inputs",
           "validate_reward_fields"]
