"""Tool schemas from signatures and docstrings (jaxrl_llm.envs.tools)."""

from __future__ import annotations

import functools
import pickle
from typing import Annotated, Any, Literal, Optional, Union

import pytest

from jaxrl_llm.envs.tools import (
    Tool,
    ToolRegistry,
    ToolSchemaError,
    function_schema,
    hint_schema,
    make_tool,
    parse_docstring,
    tool,
)

# ---------------------------------------------------------------------------- module-level tools


def add(a: int, b: float = 1.0) -> float:
    """Add two numbers.

    Args:
      a: the first summand.
      b (float): the second summand,
        on two lines.

    Returns:
      The sum.
    """
    return a + b


def search(query: str, tags: list[str], limit: Optional[int] = None, mode: Literal["fast", "exact"] = "fast",
           filters: dict[str, int] | None = None, exact: bool = False) -> list[str]:
    """Search the index.

    Args:
        query: the text to look for.
        tags: tags every hit must carry.
        limit: at most this many hits.
        mode: how to match.
        filters: field minimums.
        exact: match whole words only.
    """
    return [query]


def point(xy: tuple[int, int], scale: Union[int, float], note: Optional[str]) -> str:
    """Describe a point."""
    return f"{xy} {scale} {note}"


def undocumented(x: int, y: Annotated[str, "meta"] = "a", z: Any = None, w: tuple[float, ...] = ()) -> str:
    return str(x)


@tool
def decorated(n: int) -> int:
    """Double n."""
    return 2 * n


@tool(name="calc_mul")
def mul(a: int, b: int) -> int:
    """Multiply."""
    return a * b


class Lookup:
    """Look a key up in a table."""

    def __init__(self, table: dict[str, str]):
        self.table = table

    def __call__(self, key: str) -> str:
        return self.table[key]


# ---------------------------------------------------------------------------- schemas


def test_schema_of_a_documented_function():
    assert function_schema(add) == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "the first summand."},
                    "b": {"type": "number", "description": "the second summand, on two lines."},
                },
                "required": ["a"],
            },
        },
    }


def test_schema_types_lists_literals_optionals():
    params = function_schema(search)["function"]["parameters"]
    props = params["properties"]
    assert props["query"] == {"type": "string", "description": "the text to look for."}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "description": "tags every hit must carry."}
    assert props["limit"] == {"type": "integer", "nullable": True, "description": "at most this many hits."}
    assert props["mode"] == {"type": "string", "enum": ["fast", "exact"], "description": "how to match."}
    assert props["filters"] == {"type": "object", "additionalProperties": {"type": "integer"}, "nullable": True,
                                "description": "field minimums."}
    assert props["exact"] == {"type": "boolean", "description": "match whole words only."}
    assert params["required"] == ["query", "tags"]


def test_optional_without_default_is_not_required_and_filled_with_none():
    t = make_tool(point)
    params = t.parameters
    assert params["required"] == ["xy", "scale"]
    assert params["properties"]["xy"] == {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}]}
    assert params["properties"]["scale"] == {"type": ["integer", "number"]}
    assert params["properties"]["note"] == {"type": "string", "nullable": True}
    assert t.fill_none == ("note",)
    assert t.complete_arguments({"xy": [1, 2], "scale": 2}) == {"xy": [1, 2], "scale": 2, "note": None}
    assert t(xy=(1, 2), scale=2) == "(1, 2) 2 None"


def test_undocumented_function_annotated_any_and_variadic_tuple():
    f = function_schema(undocumented)["function"]
    assert f["description"] == ""
    assert f["parameters"]["properties"] == {
        "x": {"type": "integer"}, "y": {"type": "string"}, "z": {}, "w": {"type": "array", "items": {"type": "number"}}}
    assert f["parameters"]["required"] == ["x"]


@pytest.mark.parametrize("hint, expected", [
    (int, {"type": "integer"}), (float, {"type": "number"}), (str, {"type": "string"}), (bool, {"type": "boolean"}),
    (list, {"type": "array"}), (dict, {"type": "object"}), (list[list[int]], {"type": "array", "items": {
        "type": "array", "items": {"type": "integer"}}}),
    (Literal[1, 2], {"type": "integer", "enum": [1, 2]}), (Literal["a", 1], {"type": ["string", "integer"],
                                                                             "enum": ["a", 1]}),
    (int | str, {"type": ["integer", "string"]}),
    (list[int] | str, {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "string"}]}),
])
def test_hint_schema(hint, expected):
    assert hint_schema(hint) == expected


def test_partial_and_callable_instance():
    t = make_tool(functools.partial(add, b=2.0), name="add_two")
    assert t.name == "add_two" and t.description == "Add two numbers."
    assert t.parameters["required"] == ["a"] and t(a=1) == 3.0
    lookup = make_tool(Lookup({"k": "v"}), name="lookup")
    assert lookup.description == "Look a key up in a table."
    assert lookup.parameters["properties"] == {"key": {"type": "string"}} and lookup(key="k") == "v"


def test_matches_transformers_get_json_schema():
    """Where both apply (documented functions, Optionals with defaults), the schema is
    the one transformers derives; ours always lists "required"."""
    from transformers.utils import get_json_schema

    for fn in (add, search):
        ours = function_schema(fn)
        theirs = get_json_schema(fn)
        theirs["function"].pop("return", None)
        theirs["function"]["parameters"].setdefault("required", [])
        assert ours == theirs, fn.__name__


# ---------------------------------------------------------------------------- errors


class Custom:
    pass


def _no_hint(x, y: int) -> int:
    return y


def _custom_hint(x: Custom) -> int:
    return 0


def _varargs(*xs: int) -> int:
    return 0


def _kwargs(**kw: int) -> int:
    return 0


def _posonly(x: int, /) -> int:
    return x


def _int_keys(d: dict[int, str]) -> int:
    return 0


@pytest.mark.parametrize("fn, pattern", [
    (_no_hint, r"tool '_no_hint', parameter 'x': missing type hint"),
    (_custom_hint, r"tool '_custom_hint', parameter 'x': type hint .*Custom.* has no JSON-schema equivalent"),
    (_varargs, r"tool '_varargs', parameter 'xs': \*args / \*\*kwargs are not supported"),
    (_kwargs, r"tool '_kwargs', parameter 'kw': \*args / \*\*kwargs"),
    (_posonly, r"tool '_posonly', parameter 'x': positional-only"),
    (_int_keys, r"tool '_int_keys', parameter 'd': dict keys must be str"),
    (lambda x: x, r"tool name '<lambda>' must match"),
])
def test_unsupported_signatures_name_function_and_parameter(fn, pattern):
    with pytest.raises(ToolSchemaError, match=pattern):
        make_tool(fn)


def test_bad_name_and_non_callable():
    with pytest.raises(ToolSchemaError, match="tool name 'has space'"):
        make_tool(add, "has space")
    with pytest.raises(ToolSchemaError, match="must be callable"):
        make_tool(3)


# ---------------------------------------------------------------------------- docstrings


def test_parse_docstring_first_paragraph_and_args():
    doc = """Compute the thing,
    over two lines.

    More detail that is not the description.

    Arguments:
        x (int): an integer.
        y: a string
            that continues.
        *rest: ignored style.
    Raises:
        ValueError: never.
    """
    summary, args = parse_docstring(doc)
    assert summary == "Compute the thing, over two lines."
    assert args == {"x": "an integer.", "y": "a string that continues.", "rest": "ignored style."}
    assert parse_docstring(None) == ("", {})
    assert parse_docstring("\n    Args:\n      a: x\n") == ("", {"a": "x"})


# ---------------------------------------------------------------------------- tools and registries


def test_decorator_returns_a_picklable_tool():
    assert isinstance(decorated, Tool) and decorated.name == "decorated" and decorated(n=3) == 6
    assert mul.name == "calc_mul" and mul.schema["function"]["name"] == "calc_mul"
    assert pickle.loads(pickle.dumps(decorated)) is decorated  # by reference: the module attribute
    copy = pickle.loads(pickle.dumps(make_tool(add)))  # by value: the function by reference
    assert copy.function is add and copy.schema == make_tool(add).schema


def test_make_tool_is_idempotent_and_renames():
    t = make_tool(add)
    assert make_tool(t) is t
    renamed = make_tool(t, "plus")
    assert renamed.name == "plus" and renamed.function is add and renamed.parameters == t.parameters


def test_registry_rejects_duplicates_and_lists_schemas():
    reg = ToolRegistry([add, decorated])
    assert list(reg) == ["add", "decorated"] and len(reg) == 2 and reg["add"].function is add
    assert reg.schemas == [make_tool(add).schema, decorated.schema]
    with pytest.raises(ValueError, match="duplicate tool name 'add'"):
        reg.add(add)
    reg.add(add, name="add2")
    assert "add2" in reg
    by_key = ToolRegistry({"plus": add})
    assert list(by_key) == ["plus"] and by_key["plus"].schema["function"]["name"] == "plus"
    with pytest.raises(ValueError, match="duplicate tool name 'add'"):
        ToolRegistry([add, make_tool(search, "add")])
    with pytest.raises(TypeError, match="wrap it in a list"):
        ToolRegistry(add)
