"""Composing reward functions: weighted sums and an exception/NaN-safe wrapper.

``combine_rewards([(fn, w), ...])`` is a reward function whose score is Σ_k w_k · r_k,
with None ("could not score") propagated or replaced by a configured value.
``safe_reward_fn(fn, default)`` never raises and never returns NaN/inf: failing samples
get ``default`` and are reported on the wrapper (``last_failures``, ``failure_counts``).

Typical use::

    reward_fn = combine_rewards([
        (safe_reward_fn(math_accuracy_reward), 1.0),
        (format_reward(), 0.1),
    ])
    scores = reward_fn(prompts, completions, answer=answers)
    metrics = reward_fn.component_means()   # per-component means for logging
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxrl_llm.rewards._utils import RewardFn, reward_name


def _check_output(name: str, values: Any, n: int) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"reward function {name} must return a list of N={n} values, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} values for {n} completions")
    return list(values)


class CombinedReward:
    """Weighted sum of reward functions (see ``combine_rewards``).

    Attributes:
      components: tuple of (name, fn, weight).
      none_value: value substituted for a component's None, or None to propagate.
      skip_none: leave a component's None out of the sum instead (TRL's rule: that
        function does not apply to the sample); the sample is None only when every
        component is None.
      last_components: after a call, {name: list of that component's raw rewards}.
    """

    def __init__(self, components: Sequence[tuple[RewardFn, float]], none_value: float | None = None,
                 skip_none: bool = False):
        if not components:
            raise ValueError("components must be a non-empty sequence of (reward_fn, weight) pairs")
        named, seen = [], collections.Counter()
        for item in components:
            if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
                raise ValueError(f"components must hold (reward_fn, weight) pairs, got {item!r}")
            fn, weight = item
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"weight of {reward_name(fn)} must be a finite number, got {weight!r}")
            base = reward_name(fn)
            seen[base] += 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            named.append((name, fn, float(weight)))
        if none_value is not None and not math.isfinite(none_value):
            raise ValueError(f"none_value must be None or a finite number, got {none_value!r}")
        self.components = tuple(named)
        if skip_none and none_value is not None:
            raise ValueError("give none_value or skip_none=True, not both")
        self.none_value = none_value
        self.skip_none = skip_none
        self.last_components: dict[str, list[float | None]] = {}
        self.__name__ = "combined(" + ",".join(n for n, _, _ in named) + ")"

    def __call__(self, prompts: Sequence[str], completions: Sequence, **columns) -> list[float | None]:
        """Σ_k w_k · r_k(sample) per sample; None if some r_k is None and none_value is None."""
        n = len(completions)
        totals: list[float | None] = [None if self.skip_none else 0.0] * n
        failed = [False] * n
        self.last_components = {}
        for name, fn, weight in self.components:
            values = _check_output(name, fn(prompts, completions, **columns), n)
            self.last_components[name] = values
            for i, value in enumerate(values):
                if value is None:
                    if self.skip_none:
                        continue
                    if self.none_value is None:
                        failed[i] = True
                        continue
                    value = self.none_value
                totals[i] = (totals[i] or 0.0) + weight * float(value)
        return [None if f else t for f, t in zip(failed, totals)]

    def component_means(self, prefix: str = "reward/") -> dict[str, float]:
        """Mean of each component's scored (non-None) values in the last call, for logging."""
        out = {}
        for name, values in self.last_components.items():
            scored = [float(v) for v in values if v is not None]
            out[prefix + name] = sum(scored) / len(scored) if scored else float("nan")
        return out


def combine_rewards(
    components: Sequence[tuple[RewardFn, float]],
    *,
    none_value: float | None = None,
    skip_none: bool = False,
) -> CombinedReward:
    """A reward function returning the weighted sum Σ_k w_k · r_k of its components.

    Every component is called with the same (prompts, completions, **columns) and must
    return one value per completion. Where any component returns None for a sample, the
    combined reward is None (``none_value=None``, the default), or that component
    counts as ``none_value`` (e.g. 0.0).

    Args:
      components: non-empty sequence of (reward_fn, weight) pairs, weights finite.
      none_value: None to propagate None, or a finite float to substitute.
      skip_none: leave None out of the sum (TRL's rule); None only where all are None.

    Returns:
      A ``CombinedReward`` (callable; ``last_components`` / ``component_means()`` give
      per-component values for logging).
    """
    return CombinedReward(components, none_value=none_value, skip_none=skip_none)


@dataclasses.dataclass(frozen=True)
class RewardFailure:
    """One sample a wrapped reward function could not score.

    Attributes:
      index: position of the sample in the call's completions.
      reason: "exception", "non_finite" (NaN/inf), "bad_type" (not a number or None) or
        "bad_length" (a per-sample call did not return exactly one value).
      message: the exception text or the offending value's repr.
    """

    index: int
    reason: str
    message: str


def _slice_columns(columns: dict[str, Any], i: int, n: int, stop: int | None = None) -> dict[str, Any]:
    """View of the columns for samples ``i:stop`` (default: sample i alone): list-like
    columns of length n are sliced, anything else is passed whole."""
    stop = i + 1 if stop is None else stop
    out = {}
    for key, value in columns.items():
        if not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__") and len(value) == n:
            out[key] = value[i:stop]
        else:
            out[key] = value
    return out


class SafeRewardFn:
    """A reward function that never raises and never returns NaN/inf (see ``safe_reward_fn``).

    The wrapped function is called once on the whole batch. If that call raises (or
    returns the wrong number of values) it is called again once per sample, so that only
    the failing samples lose their score. Each failing sample gets ``default`` and a
    ``RewardFailure`` record. None returned by the wrapped function is a valid "could not
    score" answer and passes through (it is not a failure).

    Attributes:
      fn: the wrapped reward function; default: the value used for failures.
      last_failures: list of RewardFailure from the most recent call.
      num_calls, num_samples, num_failed: running totals over all calls.
      failure_counts: collections.Counter of failure reasons over all calls.

    With ``workers`` > 1 a call is cut into up to 4 · ``workers`` contiguous slices scored
    concurrently by a thread pool (each slice with its own per-sample fallback): a
    verifier that waits (a subprocess, a sandbox, a remote judge) then costs the batch
    about 1/workers of its time. The function must be safe to call from several threads.
    Calls themselves are not thread-safe (the report lives on the object).
    """

    def __init__(self, fn: RewardFn, default: float | None = None, workers: int = 1):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {fn!r}")
        if default is not None and (not isinstance(default, numbers.Real) or not math.isfinite(default)):
            raise ValueError(f"default must be None or a finite number, got {default!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected an int >= 1 (threads scoring slices of a batch), got {workers!r}")
        self.fn = fn
        self.workers = workers
        self._pool = None
        self.default = None if default is None else float(default)
        self.__name__ = reward_name(fn)
        self.last_failures: list[RewardFailure] = []
        self.failure_counts: collections.Counter[str] = collections.Counter()
        self.num_calls = self.num_samples = self.num_failed = 0

    def _clean(self, index: int, value: Any, failures: list[RewardFailure]) -> float | None:
        if value is None:
            return None
        if isinstance(value, numbers.Real) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0):
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                failures.append(RewardFailure(index, "bad_type", f"{value!r}: {err}"))
                return self.default
            if math.isfinite(value):
                return value
            failures.append(RewardFailure(index, "non_finite", repr(value)))
            return self.default
        failures.append(RewardFailure(index, "bad_type", repr(value)[:200]))
        return self.default

    def __call__(self, prompts: Sequence[str], completions: Sequence, **columns) -> list[float | None]:
        n = len(completions)
        if self.workers > 1 and n > 1:
            # a few slices per worker, handed out as workers free up: a verifier whose cost
            # varies per sample still keeps every worker busy
            w = min(4 * self.workers, n)
            bounds = [n * k // w for k in range(w + 1)]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"reward-{self.__name__}")
            parts = list(self._pool.map(
                lambda lo_hi: self._score(prompts[lo_hi[0]:lo_hi[1]], completions[lo_hi[0]:lo_hi[1]],
                                          _slice_columns(columns, lo_hi[0], n, lo_hi[1]), offset=lo_hi[0]),
                zip(bounds[:-1], bounds[1:])))
            out = [v for values, _ in parts for v in values]
            failures = [f for _, fs in parts for f in fs]
        else:
            out, failures = self._score(prompts, completions, columns)
        self.last_failures = failures
        self.failure_counts.update(f.reason for f in failures)
        self.num_calls += 1
        self.num_samples += n
        self.num_failed += len(failures)
        return out

    def _score(self, prompts: Sequence[str], completions: Sequence, columns: dict[str, Any],
               offset: int = 0) -> tuple[list[float | None], list[RewardFailure]]:
        """(scores, failures) of one batch or slice; failure indices count from ``offset``."""
        n = len(completions)
        failures: list[RewardFailure] = []
        try:
            raw = self.fn(prompts, completions, **columns)
            raw = _check_output(self.__name__, raw, n)
        except Exception:  # noqa: BLE001 - isolate the failing samples below
            raw = []
            for i in range(n):
                try:
                    one = self.fn(prompts[i : i + 1], completions[i : i + 1], **_slice_columns(columns, i, n))
                except Exception as err:  # noqa: BLE001
                    failures.append(RewardFailure(i, "exception", f"{type(err).__name__}: {err}"[:500]))
                    raw.append(_FAILED)
                    continue
                if isinstance(one, (str, bytes)) or not hasattr(one, "__len__") or len(one) != 1:
                    failures.append(RewardFailure(i, "bad_length", repr(one)[:200]))
                    raw.append(_FAILED)
                    continue
                raw.append(one[0])
        out = [self.default if v is _FAILED else self._clean(i, v, failures) for i, v in enumerate(raw)]
        failures.sort(key=lambda f: f.index)
        return out, [dataclasses.replace(f, index=f.index + offset) for f in failures]

    @property
    def failed_indices(self) -> list[int]:
        """Indices of the samples that failed in the most recent call."""
        return [f.index for f in self.last_failures]

    def metrics(self, prefix: str | None = None) -> dict[str, float]:
        """Running failure statistics for logging: failed count and rate, per reason."""
        prefix = f"reward/{self.__name__}/" if prefix is None else prefix
        out = {prefix + "num_failed": float(self.num_failed)}
        out[prefix + "fail_rate"] = self.num_failed / self.num_samples if self.num_samples else 0.0
        for reason, count in self.failure_counts.items():
            out[prefix + "failed_" + reason] = float(count)
        return out


_FAILED = object()  # sentinel for a sample whose per-sample call failed


def safe_reward_fn(fn: RewardFn, default: float | None = None, workers: int = 1) -> SafeRewardFn:
    """Wrap a reward function so per-sample exceptions and NaN/inf become ``default``.

    Args:
      fn: reward function in the TRL convention.
      default: score for failing samples: None ("could not score", the default) or a
        finite float such as 0.0.
      workers: threads that score slices of a batch concurrently (1: one call).

    Returns:
      A ``SafeRewardFn``: call it like ``fn``; after a call, ``.last_failures`` lists
      the failing samples (index, reason, message) and ``.metrics()`` gives running
      failure counts.
    """
    return SafeRewardFn(fn, default=default, workers=workers)
