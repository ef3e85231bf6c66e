"""Config fields and set-up shared by the trainers that run multi-turn episodes (GRPO
family, PPO): ``env``, ``max_turns``, ``max_total_tokens``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxrl_llm.rewards.registry import load_callable
from jaxrl_llm.train.validation import check_int_field


def check_episode_fields(config: Any) -> None:
    """``env`` is a spec string, ``max_turns`` ≥ 1, ``max_total_tokens`` None or ≥
    ``max_new_tokens`` (one full message fits an episode)."""
    check_int_field("max_turns", config.max_turns, 1, why="assistant messages per episode")
    check_int_field("max_total_tokens", config.max_total_tokens, config.max_new_tokens, optional=True,
                    why="the response area of an episode holds at least one full message; "
                        "None: 2 * max_turns * max_new_tokens")
    if not isinstance(config.env, str):
        raise ValueError(f"env must be a factory spec string (path/to/file.py:factory or module:factory) or "
                         f"'', got {config.env!r}; pass a factory object to train(env=...)")


def response_width(config: Any) -> int:
    """T of the rollout: ``max_new_tokens`` for single responses, else an episode's
    ``max_total_tokens`` (default 2 · max_turns · max_new_tokens)."""
    if config.max_turns == 1 and config.max_total_tokens is None:
        return config.max_new_tokens
    return config.max_total_tokens or 2 * config.max_turns * config.max_new_tokens


def resolve_env(env: Callable[[], Any] | None, config: Any, *, has_reward: bool) -> Callable[[], Any] | None:
    """The environment factory of a run: ``env`` itself, else the one ``config.env``
    names, else None (single-turn). Episodes are scored by their environment, so a
    reward function alongside one is an error, and so are multi-turn limits without one."""
    factory = env if env is not None else (load_callable(config.env, "env") if config.env else None)
    if factory is not None and not callable(factory):
        raise TypeError(f"env must be a factory (called with no arguments, returning an environment), got {factory!r}")
    if factory is None and (config.max_turns != 1 or config.max_total_tokens is not None):
        raise ValueError(f"max_turns={config.max_turns} / max_total_tokens={config.max_total_tokens} apply to "
                         "multi-turn episodes; give an environment (env=... or config env='module:factory')")
    if factory is not None and has_reward:
        raise ValueError("with an environment the episodes are scored by its rewards; drop reward_fn / "
                         "reward_funcs / reward_model (score final answers inside the environment's step)")
    return factory
