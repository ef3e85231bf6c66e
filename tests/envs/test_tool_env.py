"""ToolEnvironment (jaxrl_llm.envs.tool_env): a calculator episode end to end, every error
observation with its info counter, the tool-call limit, and the observation as the
multi-turn rollout renders it."""

from __future__ import annotations

import re
import socket
import time

import pytest

from jaxrl_llm.envs import Environment, Sandbox, StepResult, ToolEnvironment, ToolPickleError, check_step_result
from jaxrl_llm.envs.tool_calls import format_tool_call
from jaxrl_llm.envs.tool_env import INFO_KEYS, opening_messages
from tests.envs.qwen_template import qwen_style_tokenizer

# ---------------------------------------------------------------------------- tools (module level: picklable)


def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
      a: the first number.
      b: the second number.
    """
    return a + b


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def divide(a: float, b: float) -> float:
    """Divide a by b."""
    if b == 0:
        raise ValueError("b must not be zero")
    return a / b


def wait(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "done"


def dump(n: int) -> str:
    """A long text."""
    return "y" * n


def fetch(url: str) -> str:
    """Fetch a URL (the sandbox refuses)."""
    socket.create_connection(("127.0.0.1", 9), timeout=1.0)
    return "fetched"


def last_number_matches(record: dict, text: str) -> float:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return float(bool(numbers) and float(numbers[-1]) == float(record["answer"]))


TOOLS = [add, multiply, divide, wait, dump, fetch]
RECORD = {"prompt": "What is (2 + 3) * 4?", "answer": "20"}


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox("process")
    yield box
    box.close()


def make_env(sandbox, **kwargs) -> ToolEnvironment:
    kwargs = {"system_prompt": "Use the tools, then answer.", "timeout_s": 0.5, "max_output_chars": 50} | kwargs
    return ToolEnvironment(TOOLS, last_number_matches, sandbox=sandbox, **kwargs)


def zero_info(**counts) -> dict[str, float]:
    return dict.fromkeys(INFO_KEYS, 0.0) | {k: float(v) for k, v in counts.items()}


def call(name: str, **arguments) -> str:
    return format_tool_call(name, arguments)


# ---------------------------------------------------------------------------- the episode


def test_calculator_episode_end_to_end(sandbox):
    env = make_env(sandbox)
    assert isinstance(env, Environment)
    assert [t["function"]["name"] for t in env.tools] == ["add", "multiply", "divide", "wait", "dump", "fetch"]
    messages = env.reset(RECORD, seed=3)
    assert messages == [{"role": "system", "content": "Use the tools, then answer."},
                        {"role": "user", "content": "What is (2 + 3) * 4?"}]

    result = check_step_result(env.step("First the sum.\n" + call("add", a=2, b=3)), env)
    assert result == StepResult([{"role": "tool", "name": "add", "content": "5"}], 0.0, False, zero_info(tool_calls=1))

    result = check_step_result(env.step(call("multiply", a=5, b=4)), env)
    assert result.observation == [{"role": "tool", "name": "multiply", "content": "20"}] and not result.done

    result = check_step_result(env.step("The answer is 20."), env)
    assert result == StepResult(None, 1.0, True, zero_info())
    env.reset(RECORD, seed=4)
    assert env.step("It is 21.").reward == 0.0


def test_several_calls_in_one_message_answer_in_order(sandbox):
    env = make_env(sandbox)
    env.reset(RECORD, seed=0)
    text = call("add", a=1, b=2) + "\n" + call("nope") + "\n" + call("multiply", a=2, b=2.5)
    result = env.step(text)
    assert [m["content"] for m in result.observation] == [
        "3", "Error: unknown tool 'nope'; available: ['add', 'multiply', 'divide', 'wait', 'dump', 'fetch']", "5.0"]
    assert [m["name"] for m in result.observation] == ["add", "nope", "multiply"]
    assert result.info == zero_info(tool_calls=3, unknown_tool=1)


@pytest.mark.parametrize("text, content, counter", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": }}\n</tool_call>',
     "Error: malformed tool call: invalid JSON (Expecting value at line 1 column 44)", "malformed_calls"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n',
     "Error: malformed tool call: unclosed <tool_call> block (no </tool_call>)", "malformed_calls"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'Error: malformed tool call: missing "name"', "malformed_calls"),
    (call("sub", a=1, b=2),
     "Error: unknown tool 'sub'; available: ['add', 'multiply', 'divide', 'wait', 'dump', 'fetch']", "unknown_tool"),
    (call("add", a="1", b=2), "Error: bad arguments for tool 'add': argument 'a' must be number, got string \"1\"",
     "bad_arguments"),
    (call("add", a=1), "Error: bad arguments for tool 'add': missing required argument 'b'", "bad_arguments"),
    (call("add", a=1, b=2, c=3),
     "Error: bad arguments for tool 'add': unexpected argument 'c' (expected: 'a', 'b')", "bad_arguments"),
    (call("wait", seconds=30), "Error: tool 'wait' timed out after 0.5 s", "timeouts"),
    (call("divide", a=1, b=0), "Error: tool 'divide' raised ValueError: b must not be zero", "tool_errors"),
    (call("fetch", url="http://example.com"),
     "Error: tool 'fetch' raised PermissionError: network access is disabled in the tool sandbox", "tool_errors"),
    (call("dump", n=80), "y" * 50 + "…[truncated 30 chars]", None),
])
def test_error_observations_and_counters(sandbox, text, content, counter):
    env = make_env(sandbox)
    env.reset(RECORD, seed=0)
    result = check_step_result(env.step(text), env)
    assert result.observation[0]["content"] == content
    assert result.observation[0]["role"] == "tool"
    assert (result.reward, result.done) == (0.0, False)
    assert result.info == zero_info(tool_calls=1, **({counter: 1} if counter else {}))
    assert env.step(call("add", a=1, b=1)).observation[0]["content"] == "2"  # the episode (and worker) go on


def test_tool_call_limit_ends_the_episode(sandbox):
    env = make_env(sandbox, max_tool_calls=2, limit_reward=-1.0)
    env.reset(RECORD, seed=0)
    assert env.step(call("add", a=1, b=1) + call("add", a=2, b=2)).info["tool_calls"] == 2
    result = env.step(call("add", a=3, b=3))
    assert result == StepResult(None, -1.0, True, zero_info(tool_calls=1, tool_limit_exceeded=1))
    env.reset(RECORD, seed=1)  # a new episode has a fresh budget
    assert not env.step(call("add", a=1, b=1)).done


def test_prompt_as_messages_keeps_its_system_message(sandbox):
    env = make_env(sandbox)
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]
    assert env.reset({"prompt": messages}, seed=0) == messages
    system = {"role": "system", "content": "Use the tools, then answer."}
    assert env.reset({"prompt": messages[1:]}, seed=0) == [system, messages[1]]
    assert opening_messages("Hi") == [{"role": "user", "content": "Hi"}]
    with pytest.raises(TypeError, match="record\\['prompt'\\] must be a str or a non-empty list"):
        opening_messages([])
    with pytest.raises(KeyError, match="needs a record with a 'prompt'.*'question'"):
        env.reset({"question": "?"}, seed=0)


def test_configuration_errors(sandbox):
    with pytest.raises(RuntimeError, match="before reset"):
        make_env(sandbox).step("hi")
    with pytest.raises(ValueError, match="max_tool_calls must be an int >= 0"):
        make_env(sandbox, max_tool_calls=-1)
    with pytest.raises(ValueError, match="isolation must be one of"):
        ToolEnvironment(TOOLS, last_number_matches, isolation="vm")
    with pytest.raises(TypeError, match="reward_fn must be callable"):
        ToolEnvironment(TOOLS, "exact")

    def local(x: int) -> int:
        """Not importable."""
        return x

    with pytest.raises(ToolPickleError, match="tool 'local'"):
        ToolEnvironment([local], last_number_matches, sandbox=sandbox)
    env = ToolEnvironment([local], last_number_matches, isolation="none")  # in-process: fine
    env.reset({"prompt": "?"}, seed=0)
    assert env.step(call("local", x=4)).observation[0]["content"] == "4"


def test_in_process_environment_shares_one_sandbox():
    a = ToolEnvironment([add], last_number_matches, isolation="none")
    b = ToolEnvironment([add], last_number_matches, isolation="none")
    assert a.sandbox is b.sandbox
    a.reset(RECORD, seed=0)
    assert a.step(call("add", a=0.5, b=0.25)).observation == [{"role": "tool", "name": "add", "content": "0.75"}]


# ---------------------------------------------------------------------------- rendering


def test_observations_render_as_tool_responses_in_the_rollout():
    """The env's prompt and observations go through the rollout's own rendering
    (render_prompt / observation_ids) with a Qwen2.5-style template."""
    from jaxrl_llm.rollout import multiturn
    from jaxrl_llm.data.tokenization import render_prompt

    tok = qwen_style_tokenizer()
    env = ToolEnvironment([add], last_number_matches, isolation="none")
    prompt = render_prompt(tok, env.reset(RECORD, seed=0), tools=env.tools)
    assert '<tools>\n{"type": "function", "function": {"name": "add"' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    observation = env.step(call("add", a=2, b=3)).observation
    ids = multiturn.observation_ids(tok, observation, tools=env.tools, stop_text="<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False) == (
        "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
