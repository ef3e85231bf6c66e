"""Tool calls in the model's text (Hermes / Qwen format): parse, format, validate.

A call is a JSON object between ``<tool_call>`` tags, as Qwen2.5's chat template renders
an assistant message's ``tool_calls``::

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

A message may hold several blocks, with text around them. Parsing is whitespace
tolerant, reads ``"arguments"`` given as a JSON string holding an object (as
OpenAI-style models emit), accepts ``"parameters"`` for ``"arguments"`` and a missing
``"arguments"`` as {} (a call without arguments). Every ``<tool_call>`` block becomes a
``ToolCall`` or a ``ToolCallError`` (kind "malformed"): invalid JSON, a body that is not
an object, a missing or non-string name, arguments that are not an object, or a block
that is never closed (``</tool_call>`` missing before the next ``<tool_call>`` or the
end of the text). A stray ``</tool_call>`` is ordinary text; the tags inside a well-formed call's JSON
strings do not end or open a block.

``check_tool_call`` validates a parsed call against the registered tools: kind
"unknown_tool" (no tool of that name) or "bad_arguments" (a required argument missing,
an unexpected argument, a value of the wrong JSON type). Types are checked strictly:
integer means a JSON integer (not 3.0, not true), number accepts integers, no value is
coerced (a bool is never an integer, a number never a string).

``error_text`` is the error observation the model reads (exact formats in
``jaxrl_llm.envs.tool_env``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

MALFORMED = "malformed"
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"

_DECODER = json.JSONDecoder(strict=False)  # strict=False: raw newlines / tabs inside strings are accepted


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed tool call.

    Attributes:
      name: the tool's name.
      arguments: the arguments object (JSON values).
      span: (start, end) character offsets of the whole block in the text.
    """

    name: str
    arguments: dict[str, Any]
    span: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A tool call that cannot run.

    Attributes:
      kind: "malformed", "unknown_tool" or "bad_arguments".
      detail: what is wrong, for the model (e.g. "invalid JSON (Expecting value at line 1 column 9)").
      name: the tool's name when the block names one, else None.
      raw: the block's text between the tags (malformed calls), for logging.
      span: (start, end) character offsets of the block in the text.
      available: the registered tool names (unknown_tool).
    """

    kind: str
    detail: str
    name: str | None = None
    raw: str = ""
    span: tuple[int, int] = (0, 0)
    available: tuple[str, ...] = ()


def has_tool_call(text: str) -> bool:
    """The text opens at least one ``<tool_call>`` block (well-formed or not)."""
    return TOOL_CALL_OPEN in text


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The text a Qwen2.5-style chat template renders for one tool call (for SFT
    demonstrations): ``<tool_call>\\n{"name": "add", "arguments": {"a": 1}}\\n</tool_call>``.

    Arguments are written like the template's ``tojson`` (``json.dumps`` with
    ``ensure_ascii=False``); several calls are joined with "\\n" by the template.
    """
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """Every ``<tool_call>`` block of ``text``, in order, parsed or as a malformed-call error."""
    out: list[ToolCall | ToolCallError] = []
    pos = text.find(TOOL_CALL_OPEN)
    while pos >= 0:
        body_start = pos + len(TOOL_CALL_OPEN)
        json_end = _json_object_end(text, body_start)
        if json_end is not None:  # the object's own extent: its strings may hold the tags
            end = json_end + len(TOOL_CALL_CLOSE)
            out.append(parse_tool_call_body(text[body_start:json_end], span=(pos, end)))
            pos = text.find(TOOL_CALL_OPEN, end)
            continue
        close = text.find(TOOL_CALL_CLOSE, body_start)
        reopen = text.find(TOOL_CALL_OPEN, body_start)
        if close < 0 or 0 <= reopen < close:
            end = reopen if reopen >= 0 else len(text)
            raw = text[body_start:end]
            out.append(ToolCallError(MALFORMED, f"unclosed {TOOL_CALL_OPEN} block (no {TOOL_CALL_CLOSE})",
                                     name=_guess_name(raw), raw=raw, span=(pos, end)))
            pos = reopen
            continue
        end = close + len(TOOL_CALL_CLOSE)
        out.append(parse_tool_call_body(text[body_start:close], span=(pos, end)))
        pos = text.find(TOOL_CALL_OPEN, end)
    return out


def _json_object_end(text: str, start: int) -> int | None:
    """Where ``</tool_call>`` starts when a JSON object at ``start`` (after whitespace) is
    followed by it (after whitespace), else None."""
    i = len(text) - len(text[start:].lstrip())
    if not text.startswith("{", i):
        return None
    try:
        _, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError:
        return None
    close = len(text) - len(text[end:].lstrip())
    return close if text.startswith(TOOL_CALL_CLOSE, close) else None


def parse_tool_call_body(body: str, *, span: tuple[int, int] = (0, 0)) -> ToolCall | ToolCallError:
    """The JSON between the tags as a ToolCall, or a malformed-call error saying why."""

    def bad(detail: str, name: str | None = None) -> ToolCallError:
        return ToolCallError(MALFORMED, detail, name=name, raw=body, span=span)

    stripped = body.strip()
    if not stripped:
        return bad("empty block, expected {\"name\": ..., \"arguments\": {...}}")
    try:
        obj, end = _DECODER.raw_decode(stripped)
    except json.JSONDecodeError as e:
        return bad(f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})", _guess_name(stripped))
    if stripped[end:].strip():
        return bad(f"invalid JSON (extra text after the object: {stripped[end:].strip()[:40]!r})",
                   obj.get("name") if isinstance(obj, dict) and isinstance(obj.get("name"), str) else None)
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object {{\"name\": ..., \"arguments\": {{...}}}}, got {_json_kind(obj)}")
    name = obj.get("name")
    if name is None:
        return bad("missing \"name\"")
    if not isinstance(name, str) or not name:
        return bad(f"\"name\" must be a non-empty string, got {_json_kind(name)} {json.dumps(name)[:40]}")
    key = "arguments" if "arguments" in obj else "parameters" if "parameters" in obj else None
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):
        try:
            arguments = _DECODER.decode(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return bad(f"\"{key}\" is a string that is not valid JSON ({e.msg})", name)
    if not isinstance(arguments, dict):
        return bad(f"\"{key}\" must be a JSON object, got {_json_kind(arguments)}", name)
    return ToolCall(name, arguments, span)


def _guess_name(raw: str) -> str | None:
    """The "name" of a block that does not parse, when it is readable (for the observation)."""
    start = raw.find('"name"')
    if start < 0:
        return None
    rest = raw[start + len('"name"'):].lstrip()
    if not rest.startswith(":"):
        return None
    try:
        value, _ = _DECODER.raw_decode(rest[1:].lstrip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) and value else None


def _json_kind(value: Any) -> str:
    """The JSON type name of a decoded value ("object", "array", "string", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------- validation


def validate_arguments(arguments: Mapping[str, Any], parameters: Mapping[str, Any]) -> list[str]:
    """Problems of ``arguments`` against a tool's parameters schema ([] when they fit).

    Args:
      arguments: the call's arguments object.
      parameters: {"type": "object", "properties": {...}, "required": [...]}.

    Returns:
      list[str], e.g. ["missing required argument 'a'", "argument 'b' must be integer, got string \\"2\\""].
    """
    properties = parameters.get("properties", {})
    problems = [f"missing required argument {k!r}" for k in parameters.get("required", []) if k not in arguments]
    for key, value in arguments.items():
        if key not in properties:
            expected = ", ".join(repr(k) for k in properties) or "none"
            problems.append(f"unexpected argument {key!r} (expected: {expected})")
            continue
        problem = value_problem(value, properties[key], f"argument {key!r}")
        if problem:
            problems.append(problem)
    return problems


def value_problem(value: Any, schema: Mapping[str, Any], what: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (the subset ``jaxrl_llm.envs.tools`` writes), or None."""
    if value is None and schema.get("nullable"):
        return None
    if "anyOf" in schema:
        if any(value_problem(value, s, what) is None for s in schema["anyOf"]):
            return None
        return f"{what} must match one of {len(schema['anyOf'])} schemas, got {_shown(value)}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is_kind(value, k) for k in kinds):
            return f"{what} must be {' or '.join(kinds)}, got {_shown(value)}"
    if "enum" in schema and not any(_same_json(value, e) for e in schema["enum"]):
        return f"{what} must be one of {json.dumps(schema['enum'], ensure_ascii=False)}, got {_shown(value)}"
    if isinstance(value, list):
        if "prefixItems" in schema:
            items = schema["prefixItems"]
            if len(value) != len(items):
                return f"{what} must be an array of {len(items)} items, got {len(value)}"
            return next((p for i, (v, s) in enumerate(zip(value, items, strict=True))
                         if (p := value_problem(v, s, f"{what}[{i}]"))), None)
        if "items" in schema:
            return next((p for i, v in enumerate(value) if (p := value_problem(v, schema["items"], f"{what}[{i}]"))),
                        None)
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), Mapping):
        return next((p for k, v in value.items()
                     if (p := value_problem(v, schema["additionalProperties"], f"{what}[{k!r}]"))), None)
    return None


def _is_kind(value: Any, kind: str) -> bool:
    """``value`` has JSON type ``kind`` (no coercion: a bool is not an integer)."""
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return _json_kind(value) == kind


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (True is not 1)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    text = json.dumps(value, ensure_ascii=False)
    return f"{_json_kind(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def check_tool_call(call: ToolCall, tools: Mapping[str, Any]) -> ToolCallError | None:
    """Why ``call`` cannot run against ``tools`` (name → Tool), or None when it can.

    Returns:
      a ToolCallError of kind "unknown_tool" or "bad_arguments", or None.
    """
    if call.name not in tools:
        return ToolCallError(UNKNOWN_TOOL, f"unknown tool {call.name!r}", name=call.name, span=call.span,
                             available=tuple(tools))
    problems = validate_arguments(call.arguments, tools[call.name].parameters)
    if problems:
        return ToolCallError(BAD_ARGUMENTS, "; ".join(problems), name=call.name, span=call.span)
    return None


def error_text(error: ToolCallError) -> str:
    """The error observation of a call that cannot run:

    * malformed:     ``Error: malformed tool call: <detail>``
    * unknown_tool:  ``Error: unknown tool 'x'; available: ['add', 'mul']``
    * bad_arguments: ``Error: bad arguments for tool 'x': <problem>; <problem>``
    """
    if error.kind == UNKNOWN_TOOL:
        return f"Error: unknown tool {error.name!r}; available: {list(error.available)}"
    if error.kind == BAD_ARGUMENTS:
        return f"Error: bad arguments for tool {error.name!r}: {error.detail}"
    return f"Error: malformed tool call: {error.detail}"


def split_calls(items: Sequence[ToolCall | ToolCallError]) -> tuple[list[ToolCall], list[ToolCallError]]:
    """(calls, errors) of ``parse_tool_calls`` output."""
    return ([c for c in items if isinstance(c, ToolCall)], [c for c in items if isinstance(c, ToolCallError)])
