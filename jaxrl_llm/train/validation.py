"""Field checks shared by the frozen config dataclasses' ``__post_init__``.

Every config checks its fields, and the constraints between them, when it is constructed
(from Python, YAML or the CLI), not when the first update is traced. Each check raises a
ValueError that names the field, the value given and what is expected, e.g.
``clip_low must be in [0, 1) (...), got 1.5``.

NaN fails every range (``not low <= x`` is True for NaN), and ±inf fails unless
``finite=False``: a coefficient of inf or NaN turns every loss non-finite, and the run
would only notice through its skipped updates.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return f"{value}" if _is_real(value) else repr(value)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "a number"


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    finite: bool = True,
    why: str | None = None,
) -> None:
    """``value`` is a real number in the range [low, high] (an end open where asked, an
    end None unbounded), never NaN, finite unless ``finite=False``; or None when
    ``optional``.

    Raises:
      ValueError: ``"{name} must be {range}[ or None][ ({why})], got {value}"``.
    """
    if optional and value is None:
        return
    note = f" ({why})" if why else ""
    none = " or None" if optional else ""
    if not _is_real(value):
        raise ValueError(f"{name} must be a number{none}{note}, got {value!r}")
    ok = not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        expected = _range_text(low, high, low_open, high_open)
        if expected == "a number":
            expected = "a finite number" if finite else "a number (not NaN)"
        raise ValueError(f"{name} must be {expected}{none}{note}, got {_show(value)}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite{none}{note}, got {_show(value)}")


def check_int_field(name: str, value: Any, minimum: int | None = None, *, optional: bool = False,
              why: str | None = None) -> None:
    """``value`` is an int (not a bool) >= ``minimum``; or None when ``optional``.

    Raises:
      ValueError: ``"{name} must be >= {minimum}[ ({why})], got {value}"`` (or "must be an int").
    """
    if optional and value is None:
        return
    note = f" ({why})" if why else ""
    none = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int{none}{note}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{none}{note}, got {value}")


def check_positive_ints(config: Any, names: Sequence[str]) -> None:
    """Each of ``config``'s fields ``names`` is an int >= 1."""
    for name in names:
        check_int_field(name, getattr(config, name), 1)


def check_id_field(name: str, ids: Sequence[Any]) -> None:
    """``ids`` (e.g. ``stop_token_ids``) are ints >= 0; whether they fit the model's
    vocabulary is checked when the model is known (``rollout.sampler.check_ids_fit``)."""
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad:
        raise ValueError(f"{name} must be token ids (ints >= 0), got {list(ids)} (bad: {bad})")


def check_sampling(config: Any, *, greedy_ok: bool = False) -> None:
    """The sampling fields ``temperature``, ``top_k``, ``top_p`` (and ``min_p`` when the
    config has one) and ``stop_token_ids``, with the checks ``generate`` runs
    (``rollout.filters.validate_sampling_args``).

    Args:
      greedy_ok: temperature 0 (greedy decoding) is allowed; RL trainers need > 0, since
        their losses are importance-weighted by the sampling distribution's log-probs.
    """
    from jaxrl_llm.rollout.filters import validate_sampling_args

    if greedy_ok:
        check_real("temperature", config.temperature, low=0, why="0 means greedy")
    else:
        check_real("temperature", config.temperature, low=0, low_open=True,
                   why="RL needs a sampling distribution; 0 would be greedy")
    validate_sampling_args(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                           min_p=getattr(config, "min_p", 0.0))
    check_id_field("stop_token_ids", config.stop_token_ids)


def check_policy_clip(clip_low: Any, clip_high: Any, dual_clip: Any = None) -> None:
    """PPO / GSPO ratio clipping, as ``ops.ppo_policy_loss`` and ``ops.gspo_policy_loss``
    accept it: the ratio is clipped to [1 − clip_low, 1 + clip_high]."""
    check_real("clip_low", clip_low, low=0, high=1, high_open=True,
               why="the ratio is clipped below at 1 - clip_low, which must stay > 0")
    check_real("clip_high", clip_high, low=0, finite=False, why="the ratio is clipped above at 1 + clip_high")
    check_real("dual_clip", dual_clip, low=1, low_open=True, optional=True,
               why="dual-clip PPO bounds a negative-advantage token's loss by -dual_clip·A, its loss at "
                   "ratio dual_clip; at or below ratio 1 that bound cuts into the clipped surrogate; "
                   "None turns it off")


def check_rollout_correction(config: Any) -> None:
    """The rollout-correction fields (``tis_cap``, ``tis_level``, ``tis_mode``,
    ``tis_lower``, ``tis_veto``; ``ops.rollout_correction``): valid values, and no option
    set while ``tis_cap`` is None (it would be ignored)."""
    from jaxrl_llm.ops.rollout_correction import IS_LEVELS, IS_MODES

    if config.tis_level not in IS_LEVELS:
        raise ValueError(f"tis_level must be one of {IS_LEVELS}, got {config.tis_level!r}")
    if config.tis_mode not in IS_MODES:
        raise ValueError(f"tis_mode must be one of {IS_MODES}, got {config.tis_mode!r}")
    check_real("tis_veto", config.tis_veto, low=0, high=1, low_open=True, optional=True,
               why="responses holding a token ratio below it are rejected; None: off")
    if config.tis_cap is None:
        set_ = [f"{name}={getattr(config, name)!r}" for name, default in
                (("tis_level", "token"), ("tis_mode", "truncate"), ("tis_lower", None), ("tis_veto", None))
                if getattr(config, name) != default]
        if set_:
            raise ValueError(f"{', '.join(set_)} need tis_cap (the correction is off with tis_cap=None)")
        return
    if config.tis_mode == "truncate" and config.tis_lower is not None:
        raise ValueError(f"tis_lower={config.tis_lower} is a rejection bound: it applies to tis_mode='mask' only")
    if config.tis_mode == "mask":
        lower = 1.0 / config.tis_cap if config.tis_lower is None else config.tis_lower
        check_real("tis_lower", lower, low=0, low_open=True, why="the lower rejection bound (None: 1 / tis_cap)")
        if not lower < config.tis_cap:
            raise ValueError(f"tis_lower must be < tis_cap={config.tis_cap} (None: 1 / tis_cap, so tis_cap > 1), "
                             f"got {lower}")

