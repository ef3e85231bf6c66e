"""Parsing, formatting and validating tool calls (jaxrl_llm.envs.tool_calls), including
round trips through a Qwen2.5-style chat template's own rendering."""

from __future__ import annotations

import json
import re
from typing import Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_llm.envs.tool_calls import (
    BAD_ARGUMENTS,
    MALFORMED,
    UNKNOWN_TOOL,
    ToolCall,
    ToolCallError,
    check_tool_call,
    error_text,
    format_tool_call,
    has_tool_call,
    parse_tool_calls,
    split_calls,
    validate_arguments,
)
from jaxrl_llm.envs.tools import ToolRegistry
from tests.envs.qwen_template import qwen_style_tokenizer


def add(a: int, b: float) -> float:
    """Add two numbers.

    Args:
      a: an integer.
      b: a number.
    """
    return a + b


def tag(text: str, labels: list[str], mode: Literal["x", "y"] = "x", flag: bool = False,
        extra: Optional[dict[str, int]] = None) -> str:
    """Tag a text."""
    return text


TOOLS = ToolRegistry([add, tag])


def _one(text: str) -> ToolCall | ToolCallError:
    items = parse_tool_calls(text)
    assert len(items) == 1, items
    return items[0]


# ---------------------------------------------------------------------------- parsing


def test_format_is_the_qwen_block_and_parses_back():
    text = format_tool_call("add", {"a": 1, "b": 2.5})
    assert text == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>'
    call = _one(text)
    assert call == ToolCall("add", {"a": 1, "b": 2.5}, (0, len(text)))


_json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False,
                                                                                 allow_infinity=False) | st.text()
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner,
                                                                                             max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
       arguments=st.dictionaries(st.text(), _json, max_size=4),
       before=st.text(), after=st.text())
def test_round_trip_with_surrounding_text(name, arguments, before, after):
    if "<tool_call>" in before + after or "</tool_call>" in before + after:
        return
    items = parse_tool_calls(before + format_tool_call(name, arguments) + after)
    assert len(items) == 1 and isinstance(items[0], ToolCall)
    assert items[0].name == name and items[0].arguments == arguments


def test_several_blocks_whitespace_and_text_around():
    text = ('Let me compute. <tool_call>  {"name":"add","arguments":{"a":1,"b":2}}  </tool_call>\n'
            'and\n<tool_call>\n\n{\n  "name": "tag",\n  "arguments": {"text": "hi", "labels": []}\n}\n\n'
            '</tool_call> done')
    calls, errors = split_calls(parse_tool_calls(text))
    assert not errors
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("tag", {"text": "hi", "labels": []})]
    assert text[calls[0].span[0]:calls[0].span[1]].startswith("<tool_call>")
    assert text[calls[1].span[0]:calls[1].span[1]].endswith("</tool_call>")


def test_lenient_forms():
    # arguments as a JSON string holding an object (OpenAI-style), "parameters" alias, no arguments
    assert _one('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>').arguments == \
        {"a": 1, "b": 2}
    assert _one('<tool_call>{"name": "add", "parameters": {"a": 1}}</tool_call>').arguments == {"a": 1}
    text = '<tool_call>{"name": "now"}</tool_call>'
    assert _one(text) == ToolCall("now", {}, (0, len(text)))
    # a raw newline inside a string (models write them) is accepted
    assert _one('<tool_call>{"name": "tag", "arguments": {"text": "a\nb"}}</tool_call>').arguments == {"text": "a\nb"}


@pytest.mark.parametrize("body, detail", [
    ('{"name": "add", "arguments": {"a": 1,}}', r"invalid JSON \(Expecting property name"),
    ('{"name": "add", "arguments": {"a": 1}} trailing', r"invalid JSON \(extra text after the object"),
    ("", r"empty block"),
    ('["add", {"a": 1}]', r"expected a JSON object .*, got array"),
    ('{"arguments": {"a": 1}}', r'missing "name"'),
    ('{"name": 3, "arguments": {}}', r'"name" must be a non-empty string, got integer 3'),
    ('{"name": "", "arguments": {}}', r'"name" must be a non-empty string'),
    ('{"name": "add", "arguments": [1, 2]}', r'"arguments" must be a JSON object, got array'),
    ('{"name": "add", "arguments": null}', r'"arguments" must be a JSON object, got null'),
    ('{"name": "add", "arguments": "[1, 2]"}', r'"arguments" must be a JSON object, got array'),
    ('{"name": "add", "arguments": "{oops"}', r'"arguments" is a string that is not valid JSON'),
])
def test_malformed_blocks(body, detail):
    err = _one(f"<tool_call>{body}</tool_call>")
    assert isinstance(err, ToolCallError) and err.kind == MALFORMED and err.raw == body
    assert re.search(detail, err.detail), err.detail
    assert error_text(err) == f"Error: malformed tool call: {err.detail}"


def test_malformed_json_keeps_a_readable_name():
    err = _one('<tool_call>{"name": "add", "arguments": {"a": }}</tool_call>')
    assert err.kind == MALFORMED and err.name == "add"


def test_unclosed_blocks():
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
    err = _one(text)
    assert err.kind == MALFORMED and err.detail == "unclosed <tool_call> block (no </tool_call>)"
    assert err.name == "add" and err.span == (0, len(text))
    # an unclosed block followed by a good one: both reported, in order
    items = parse_tool_calls('<tool_call>{"name": "x"  <tool_call>{"name": "add", "arguments": {}}</tool_call>')
    assert [type(i).__name__ for i in items] == ["ToolCallError", "ToolCall"]
    assert items[0].detail.startswith("unclosed") and items[1].name == "add"


def test_has_tool_call_and_stray_close_tag():
    assert has_tool_call("x <tool_call> y") and not has_tool_call("the answer is 5")
    assert parse_tool_calls("text </tool_call> more") == []
    assert parse_tool_calls("no calls") == []


# ---------------------------------------------------------------------------- validation


def test_unknown_tool():
    err = check_tool_call(ToolCall("sub", {"a": 1}), TOOLS)
    assert err.kind == UNKNOWN_TOOL
    assert error_text(err) == "Error: unknown tool 'sub'; available: ['add', 'tag']"


@pytest.mark.parametrize("arguments, problems", [
    ({"a": 1, "b": 2.5}, []),
    ({"a": 1, "b": 2}, []),  # an integer is a number
    ({"a": 1}, ["missing required argument 'b'"]),
    ({"a": 1, "b": 2, "c": 3}, ["unexpected argument 'c' (expected: 'a', 'b')"]),
    ({"a": "1", "b": 2}, ['argument \'a\' must be integer, got string "1"']),
    ({"a": True, "b": 2}, ["argument 'a' must be integer, got boolean true"]),  # no bool → int coercion
    ({"a": 1.0, "b": 2}, ["argument 'a' must be integer, got number 1.0"]),
    ({"a": 1, "b": False}, ["argument 'b' must be number, got boolean false"]),
    ({"a": None, "b": None}, ["argument 'a' must be integer, got null", "argument 'b' must be number, got null"]),
])
def test_validate_add(arguments, problems):
    assert validate_arguments(arguments, TOOLS["add"].parameters) == problems


@pytest.mark.parametrize("arguments, problem", [
    ({"text": "t", "labels": ["a", "b"], "mode": "y", "flag": True, "extra": {"k": 1}}, None),
    ({"text": "t", "labels": [], "extra": None}, None),  # Optional accepts null
    ({"text": 5, "labels": []}, "argument 'text' must be string, got integer 5"),
    ({"text": "t", "labels": ["a", 2]}, "argument 'labels'[1] must be string, got integer 2"),
    ({"text": "t", "labels": "a"}, 'argument \'labels\' must be array, got string "a"'),
    ({"text": "t", "labels": [], "mode": "z"}, 'argument \'mode\' must be one of ["x", "y"], got string "z"'),
    ({"text": "t", "labels": [], "flag": 1}, "argument 'flag' must be boolean, got integer 1"),
    ({"text": "t", "labels": [], "extra": {"k": "v"}}, "argument 'extra'['k'] must be integer, got string \"v\""),
])
def test_validate_nested(arguments, problem):
    err = check_tool_call(ToolCall("tag", arguments), TOOLS)
    if problem is None:
        assert err is None
    else:
        assert err.kind == BAD_ARGUMENTS and err.detail == problem
        assert error_text(err) == f"Error: bad arguments for tool 'tag': {problem}"


# ---------------------------------------------------------------------------- the chat template's own rendering


def _assistant_texts(rendered: str) -> list[str]:
    """The text of every assistant turn of a ChatML rendering."""
    head, tail = "<|im_start|>assistant\n", "<|im_end|>"
    out, pos = [], rendered.find(head)
    while pos >= 0:
        end = rendered.find(tail, pos)
        out.append(rendered[pos + len(head):end])
        pos = rendered.find(head, end)
    return out


def test_round_trip_through_the_qwen_chat_template():
    tok = qwen_style_tokenizer()
    calls = [("add", {"a": 2, "b": 3.5}),
             ("tag", {"text": 'quote " and ünïcödé 東京 \\ back', "labels": ["x", "y"], "extra": {"n": -1}})]
    messages = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Add 2 and 3.5, then tag it."},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]},
        {"role": "tool", "name": "add", "content": "5.5"},
        {"role": "tool", "name": "tag", "content": "ok"},
        {"role": "assistant", "content": "The answer is 5.5."},
    ]
    rendered = tok.apply_chat_template(messages, tools=TOOLS.schemas, tokenize=False)
    # what the policy writes is the template's own text, token for token
    ids = tok.encode(rendered, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == rendered
    first, final = _assistant_texts(rendered)
    assert first == "\n".join(format_tool_call(n, a) for n, a in calls)
    parsed = parse_tool_calls(first)
    assert [(c.name, c.arguments) for c in parsed] == calls
    assert all(check_tool_call(c, TOOLS) is None for c in parsed)
    assert parse_tool_calls(final) == []
    # the system prompt lists every tool's schema, as the template's tojson writes it
    system = rendered[:rendered.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nUse the tools.\n\n# Tools")
    listed = system[system.index("<tools>\n") + len("<tools>\n"):system.index("\n</tools>")].split("\n")
    assert [json.loads(line) for line in listed] == TOOLS.schemas
    assert listed == [json.dumps(s, ensure_ascii=False) for s in TOOLS.schemas]
    # the tool messages come back as <tool_response> blocks in one user turn
    assert "<|im_start|>user\n<tool_response>\n5.5\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>" \
        in rendered


def test_arguments_given_as_a_json_string_render_and_parse():
    """OpenAI-style messages carry arguments as a JSON string; Qwen2.5's template then
    writes a quoted string, which the parser reads back as the object."""
    tok = qwen_style_tokenizer()
    args = {"a": 1, "b": 2}
    messages = [{"role": "user", "content": "?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": json.dumps(args)}}]}]
    rendered = tok.apply_chat_template(messages, tools=TOOLS.schemas, tokenize=False)
    (text,) = _assistant_texts(rendered)
    assert _one(text).arguments == args
