"""The environment protocol of multi-turn rollouts.

An environment is one episode's counterpart of the policy. The rollout
(:func:`jaxrl_llm.rollout.multiturn.generate_episodes`) drives it:

1. ``messages = env.reset(record, seed=seed)`` — the opening chat messages (system, user)
   for one dataset record; ``seed`` makes any randomness of the environment reproducible
   (the rollout derives it from the run seed, the step and the row, so a resumed run
   replays the same episodes).
2. The policy writes one assistant message (decoding until a stop token).
3. ``result = env.step(assistant_text)`` — a :class:`StepResult`: the observation
   messages to append (e.g. ``{"role": "tool", "content": ...}``), or None when there is
   nothing to append; the reward of this step; whether the episode is over; and an
   ``info`` dict of numbers that the trainer averages into its metrics.
4. Until ``done``, no observation, ``max_turns`` or the token budget: the observation is
   rendered by the chat template, appended to the sequence (masked out of the loss) and
   the policy writes the next assistant message.

The trajectory's reward is the sum of its step rewards. An environment may expose
``tools``: a list of JSON-schema tool descriptions, passed to the chat template as
``tools=`` when the prompt is rendered.

Worked example (a guessing game: the policy names a number, the environment answers
"higher" / "lower" until it is right)::

    class GuessEnv:
        tools = None

        def reset(self, record, *, seed):
            self.target = int(record["target"])
            return [{"role": "user", "content": "Guess my number (1-9)."}]

        def step(self, text):
            guess = text.strip()
            if guess == str(self.target):
                return StepResult(None, 1.0, True, {"correct": 1.0})
            hint = "higher" if guess.isdigit() and int(guess) < self.target else "lower"
            return StepResult([{"role": "user", "content": hint}], 0.0, False, {"correct": 0.0})

    # jaxrl-llm grpo --env my_envs.py:GuessEnv ...   (a factory: called with no arguments)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass
class StepResult:
    """What ``Environment.step`` returns.

    Attributes:
      observation: chat messages to append after the assistant's message, or None (the
        episode ends: nothing for the policy to answer).
      reward: this step's reward (a finite float).
      done: the episode is over (the observation, if any, is not appended).
      info: numbers to log, averaged over the steps of a batch (e.g. tool-call counts).
    """

    observation: list[dict] | None
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (see the module docstring)."""

    def reset(self, record: dict, *, seed: int) -> list[dict]:
        """The opening messages of an episode on ``record``."""

    def step(self, assistant_message: str) -> StepResult:
        """The environment's answer to the policy's message."""


def check_step_result(result: Any, env: Any) -> StepResult:
    """``result`` as a StepResult, or a TypeError naming the environment and what it returned.

    A (observation, reward, done, info) tuple is accepted too.
    """
    if isinstance(result, tuple) and len(result) == 4:
        result = StepResult(*result)
    if not isinstance(result, StepResult):
        raise TypeError(f"{type(env).__name__}.step must return a StepResult (or an (observation, reward, done, info) "
                        f"tuple), got {type(result).__name__}: {result!r}")
    if result.observation is not None:
        check_messages_list(result.observation, f"{type(env).__name__}.step observation")
    try:
        reward = float(result.reward)
    except (TypeError, ValueError):
        raise TypeError(f"{type(env).__name__}.step reward must be a number, got {result.reward!r}") from None
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise ValueError(f"{type(env).__name__}.step returned a non-finite reward {reward!r}")
    if not isinstance(result.info, dict):
        raise TypeError(f"{type(env).__name__}.step info must be a dict of numbers, got {result.info!r}")
    return dataclasses.replace(result, reward=reward, done=bool(result.done))


def check_messages_list(messages: Any, what: str) -> list[dict]:
    """``messages`` is a list of {"role": str, "content": str, ...} dicts (a clear error otherwise)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"{what} must be a list of chat messages (dicts with 'role' and 'content'), got {messages!r}")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"{what}: each message needs a str 'role' and a str 'content', got {m!r}")
    return messages
