"""``ToolEnvironment``: an episode in which the policy may call Python tools before it
answers (the ``jaxrl_llm.envs.base`` protocol).

Each assistant message is either

* a tool step: it holds ``<tool_call>`` blocks (``jaxrl_llm.envs.tool_calls``). Every
  block is validated and run (``jaxrl_llm.envs.sandbox``) in order; the observation is one
  message per block, ``{"role": "tool", "name": <tool name, "" when unreadable>,
  "content": <output or error text>}``; reward 0.0, not done. Or
* the final answer (no ``<tool_call>``): reward ``reward_fn(record, text)``, observation
  None, done.

Tool-call limit: a tool step whose blocks would bring the episode's total above
``max_tool_calls`` ends the episode instead: none of its calls runs, observation None,
reward ``limit_reward`` (0.0 by default), ``info["tool_limit_exceeded"] = 1``.

Error observations (the ``content`` of the tool message; nothing raises for what the
model writes or a tool does)::

    Error: malformed tool call: <detail>
        detail: invalid JSON (<json error> at line L column C) | missing "name"
              | "arguments" must be a JSON object, got <type> | unclosed <tool_call> block (no </tool_call>)
              | ... (see jaxrl_llm.envs.tool_calls)
    Error: unknown tool 'x'; available: ['add', 'mul']
    Error: bad arguments for tool 'x': missing required argument 'a'; unexpected argument 'c' (expected: 'a', 'b');
           argument 'b' must be integer, got string "2"
    Error: tool 'x' timed out after 1.0 s
    Error: tool 'x' raised ValueError: <message>        (the message capped at max_output_chars)
    Error: tool 'x' crashed: the worker process exited with code -9

A successful call's content is the tool's output (``jaxrl_llm.envs.sandbox``), cut to
``max_output_chars`` characters plus ``…[truncated N chars]``.

``info`` (numbers, the same keys at every step): ``tool_calls`` (blocks in the message),
``malformed_calls``, ``unknown_tool``, ``bad_arguments``, ``timeouts``, ``tool_errors``
(the tool raised or its worker crashed), ``tool_limit_exceeded``.

Example (an env factory for ``jaxrl-llm grpo --env my_envs.py:make_env``)::

    def add(a: float, b: float) -> float:
        '''Add two numbers.'''
        return a + b

    def exact_match(record, text):
        return float(text.strip() == str(record["answer"]))

    def make_env():
        return ToolEnvironment([add], exact_match, system_prompt="Use the tools, then answer.")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxrl_llm.envs.base import StepResult, check_messages_list
from jaxrl_llm.envs.sandbox import ISOLATIONS, Sandbox, outcome_text, shared_sandbox
from jaxrl_llm.envs.tool_calls import (
    BAD_ARGUMENTS,
    MALFORMED,
    UNKNOWN_TOOL,
    ToolCall,
    ToolCallError,
    check_tool_call,
    error_text,
    has_tool_call,
    parse_tool_calls,
)
from jaxrl_llm.envs.tools import Tool, ToolRegistry, as_registry

INFO_KEYS = ("tool_calls", "malformed_calls", "unknown_tool", "bad_arguments", "timeouts", "tool_errors",
             "tool_limit_exceeded")
_ERROR_COUNTERS = {MALFORMED: "malformed_calls", UNKNOWN_TOOL: "unknown_tool", BAD_ARGUMENTS: "bad_arguments"}


def opening_messages(prompt: Any, system_prompt: str | None = None) -> list[dict]:
    """The chat messages an episode opens with.

    Args:
      prompt: a string (one user message) or a list of {"role", "content"} messages.
      system_prompt: prepended as a system message unless the prompt already opens with one
        (then the prompt's own system message is kept).
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [dict(m) if isinstance(m, Mapping) else m for m in prompt]
        check_messages_list(messages, "record['prompt']")
    else:
        raise TypeError(f"record['prompt'] must be a str or a non-empty list of chat messages, got {prompt!r:.120}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class ToolEnvironment:
    """A tool-using episode (see the module docstring).

    Args:
      tools: functions / Tools (a list, a {name: function} dict or a ToolRegistry).
      reward_fn: ``reward_fn(record, final_text) -> float``, the reward of the final answer.
      system_prompt: the system message (kept out when the record's prompt has one).
      max_tool_calls: the most tool-call blocks an episode may write (>= 0).
      timeout_s: wall-clock limit of one tool call, seconds.
      max_output_chars: cap on the text of one tool observation.
      isolation: "process" (a worker process, no network) or "none" (in this process).
      sandbox: the Sandbox to run calls in (default: ``shared_sandbox(isolation)``, one
        worker for every environment of the process).
      limit_reward: the reward of a step that exceeds ``max_tool_calls``.

    Attributes:
      tools: the tools' JSON schemas (what the chat template gets as ``tools=``).
      registry: name → Tool.
    """

    def __init__(self, tools: ToolRegistry | Iterable[Callable | Tool] | Mapping[str, Callable | Tool],
                 reward_fn: Callable[[dict, str], float], *, system_prompt: str | None = None,
                 max_tool_calls: int = 8, timeout_s: float = 5.0, max_output_chars: int = 2000,
                 isolation: str = "process", sandbox: Sandbox | None = None, limit_reward: float = 0.0):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable as reward_fn(record, final_text) -> float, got {reward_fn!r}")
        if not (isinstance(max_tool_calls, int) and max_tool_calls >= 0):
            raise ValueError(f"max_tool_calls must be an int >= 0, got {max_tool_calls!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if not (isinstance(max_output_chars, int) and max_output_chars >= 1):
            raise ValueError(f"max_output_chars must be an int >= 1, got {max_output_chars!r}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.registry = as_registry(tools)
        self.tools = self.registry.schemas
        self.reward_fn = reward_fn
        self.system_prompt = system_prompt
        self.max_tool_calls = max_tool_calls
        self.timeout_s = float(timeout_s)
        self.max_output_chars = max_output_chars
        self.limit_reward = float(limit_reward)
        self.sandbox = sandbox if sandbox is not None else shared_sandbox(isolation)
        for t in self.registry.values():  # a tool the worker cannot receive fails here, not mid-run
            self.sandbox.check(t, t.name)
        self.record: dict | None = None
        self.seed: int | None = None
        self.calls_used = 0

    def reset(self, record: dict, *, seed: int) -> list[dict]:
        """The opening messages of ``record["prompt"]`` (a string or chat messages)."""
        if not isinstance(record, Mapping) or "prompt" not in record:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise KeyError(f"ToolEnvironment needs a record with a 'prompt' (str or chat messages), got {keys}")
        self.record, self.seed, self.calls_used = dict(record), seed, 0
        return opening_messages(record["prompt"], self.system_prompt)

    def step(self, assistant_message: str) -> StepResult:
        """Run the message's tool calls, or score it as the final answer."""
        if self.record is None:
            raise RuntimeError("ToolEnvironment.step called before reset")
        info = dict.fromkeys(INFO_KEYS, 0.0)
        if not has_tool_call(assistant_message):
            reward = float(self.reward_fn(self.record, assistant_message))
            return StepResult(None, reward, True, info)
        calls = parse_tool_calls(assistant_message)
        info["tool_calls"] = float(len(calls))
        if self.calls_used + len(calls) > self.max_tool_calls:
            info["tool_limit_exceeded"] = 1.0
            return StepResult(None, self.limit_reward, True, info)
        self.calls_used += len(calls)
        observation = [self._observe(call, info) for call in calls]
        return StepResult(observation, 0.0, False, info)

    def _observe(self, call: ToolCall | ToolCallError, info: dict[str, float]) -> dict:
        """One call's tool message; counts its failure in ``info``."""
        error = call if isinstance(call, ToolCallError) else check_tool_call(call, self.registry)
        if error is not None:
            info[_ERROR_COUNTERS[error.kind]] += 1
            return {"role": "tool", "name": error.name or "", "content": error_text(error)}
        outcome = self.sandbox.run(self.registry[call.name], call.arguments, name=call.name,
                                   timeout_s=self.timeout_s, max_output_chars=self.max_output_chars)
        if outcome.status == "timeout":
            info["timeouts"] += 1
        elif outcome.status in ("error", "crash"):
            info["tool_errors"] += 1
        return {"role": "tool", "name": call.name, "content": outcome_text(call.name, outcome, self.max_output_chars)}
