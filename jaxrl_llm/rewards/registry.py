"""Reward functions by name: the built-ins, your own file or module, and weighted lists.

A *reward spec* is a string the CLI and the configs (``reward_funcs``) accept:

- a built-in name (``BUILTIN_REWARDS``): ``arithmetic``, ``math``, ``think_answer_format``,
  ``think_answer_tags``;
- ``path/to/file.py:function``: the function ``function`` of that file;
- ``package.module:function``: the function of an importable module.

``build_reward(reward_funcs, reward_weights)`` turns a list of functions (or specs) into
the one function a trainer calls: the function itself when there is one (and no weight),
otherwise their weighted sum (``combine_rewards``; TRL's ``reward_funcs`` +
``reward_weights``, whose weights also default to 1 each).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxrl_llm.rewards._utils import RewardFn
from jaxrl_llm.rewards.arithmetic import arithmetic_reward
from jaxrl_llm.rewards.combine import combine_rewards
from jaxrl_llm.rewards.format import format_reward, tag_count_reward
from jaxrl_llm.rewards.math import math_accuracy_reward

# name -> factory (format rewards are built by a factory with their default tags)
_BUILTINS: dict[str, Callable[[], RewardFn]] = {
    "arithmetic": lambda: arithmetic_reward,
    "math": lambda: math_accuracy_reward,
    "think_answer_format": format_reward,
    "think_answer_tags": tag_count_reward,
}
BUILTIN_REWARDS = tuple(_BUILTINS)
SPEC_FORMS = "a built-in name {names}, path/to/file.py:function or package.module:function"


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function a spec names (see the module docstring).

    Raises:
      ValueError: unknown name, missing file, unimportable module, or no such function;
        the message names the spec and the accepted forms.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    if spec in _BUILTINS:
        return _BUILTINS[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}; expected {SPEC_FORMS.format(names=list(BUILTIN_REWARDS))}")
    return load_callable(spec, "reward")


def load_callable(spec: str, what: str) -> Callable:
    """The callable ``name`` of ``path/to/file.py:name`` or ``package.module:name``
    (reward functions, environment factories).

    Raises:
      ValueError: no ':' in the spec, a missing file, an unimportable module, or no such
        callable; the message starts with ``what`` and the spec and lists what is there.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} {spec!r}: expected path/to/file.py:name or package.module:name")
    target, _, attr = spec.rpartition(":")
    module = _load_file(spec, target, what) if target.endswith(".py") else _import_module(spec, target, what)
    fn = getattr(module, attr, None)
    if not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{what} {spec!r}: {target!r} has no function {attr!r}; functions there: {public}")
    return fn


def _load_file(spec: str, target: str, what: str):
    path = Path(target).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {spec!r}: file {target!r} not found (relative to {Path.cwd()})")
    name = f"_jaxrl_llm_{what.replace(' ', '_')}_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses / pickling inside the file look themselves up here
    module_spec.loader.exec_module(module)
    return module


def _import_module(spec: str, target: str, what: str):
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import module {target!r} ({err})") from err


def build_reward(
    reward_funcs: RewardFn | str | Sequence[RewardFn | str],
    reward_weights: Sequence[float] | None = None,
) -> RewardFn:
    """One reward function from one or several functions or specs.

    Args:
      reward_funcs: a function, a spec, or a non-empty sequence of them.
      reward_weights: one finite weight per function (None: 1 each).

    Returns:
      The function itself (one function, no weights), else a ``CombinedReward`` computing
      Σ_k w_k · r_k over the functions that score the sample (TRL's rule: a None means
      the function does not apply; the sample is None only when none applies).
    """
    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
    if not funcs:
        raise ValueError("reward_funcs is empty; give at least one reward function or spec")
    funcs = [load_reward_fn(f) if isinstance(f, str) else f for f in funcs]
    for f in funcs:
        if not callable(f):
            raise ValueError(f"reward_funcs must hold functions or spec strings, got {f!r}")
    if reward_weights is None:
        return funcs[0] if len(funcs) == 1 else combine_rewards([(f, 1.0) for f in funcs], skip_none=True)
    weights = list(reward_weights)
    if len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions; "
                         "give one weight per function")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"reward_weights must be finite numbers, got {weights}")
    return combine_rewards(list(zip(funcs, map(float, weights))), skip_none=True)
