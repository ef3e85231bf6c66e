"""Tools: plain Python functions the policy may call, described by JSON schemas.

A tool is a function with type hints and (optionally) a Google-style docstring::

    def add(a: int, b: int) -> int:
        '''Add two integers.

        Args:
          a: the first summand.
          b: the second summand.
        '''
        return a + b

    calc = make_tool(add)          # or decorate: @tool
    calc.schema == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "integer", "description": "the first summand."},
                                      "b": {"type": "integer", "description": "the second summand."}},
                       "required": ["a", "b"]}}}

The schema is the OpenAI / Hugging Face function-calling format that chat templates take
as ``tools=``. It follows ``transformers.utils.get_json_schema`` where both apply (same
types, ``nullable`` for Optional, ``enum`` for Literal, ``prefixItems`` for fixed
tuples, ``additionalProperties`` for ``dict[str, X]``) but does not require a docstring:

* the description is the docstring's first paragraph ("" without a docstring), and a
  parameter gets a ``description`` only when the ``Args:`` section documents it;
* ``required`` is always present (possibly empty) and lists the parameters without a
  default that are not Optional. An Optional parameter without a default is passed as
  None when the model leaves it out (``Tool.complete_arguments``).

Type hints: int → integer, float → number, str → string, bool → boolean, None → null,
Any → {} (anything), list[X] → array of X, tuple[X, ...] → array of X, tuple[X, Y] →
array with prefixItems, dict / dict[str, X] → object, Literal[...] → enum, Optional[X]
/ X | None → X with nullable, Union[X, Y] → a type list or anyOf, Annotated[X, ...] → X.
Anything else (custom classes, Enum, *args, **kwargs, positional-only parameters) is a
``ToolSchemaError`` naming the function and the parameter.

Tools run in a worker process by default (``jaxrl_llm.envs.sandbox``), so their
functions must be importable by reference: module-level functions (not lambdas, nested
functions or functions defined in ``__main__``), ``functools.partial`` objects of such
functions, or instances of module-level classes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, Union, get_args, get_origin

# Python type → JSON-schema type of a bare hint (bool before int does not matter: the
# lookup is by identity of the hint, and bool is its own hint).
_BASIC_TYPES: dict[Any, dict] = {
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    list: {"type": "array"},
    tuple: {"type": "array"},
    dict: {"type": "object"},
}
_JSON_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # what OpenAI-style APIs and templates accept
_ARGS_HEADERS = ("args:", "arguments:", "parameters:", "params:")
_SECTION_RE = re.compile(r"^(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|Attributes|"
                         r"Warnings?|See Also|References|Todo|Shapes?):$")
_ARG_LINE_RE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")  # "name (type): text"


class ToolSchemaError(TypeError):
    """A function cannot be described as a tool (unsupported signature or type hint)."""


# ---------------------------------------------------------------------------- schemas


def hint_schema(hint: Any, *, where: str = "") -> dict:
    """The JSON schema of one type hint (see the module docstring for the mapping).

    Args:
      hint: a resolved type hint (``typing.get_type_hints`` output).
      where: names the function and parameter in errors, e.g. "tool 'add', parameter 'a'".

    Raises:
      ToolSchemaError: the hint has no JSON-schema equivalent.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return {}
    if origin is None:
        if isinstance(hint, type) and hint in _BASIC_TYPES:
            return dict(_BASIC_TYPES[hint])
        raise _unsupported(hint, where)
    if origin is typing.Annotated:
        return hint_schema(args[0], where=where)
    if origin is Union or origin is types.UnionType:
        members = [hint_schema(a, where=where) for a in args if a is not type(None)]
        if len(members) == 1:
            out = members[0]
        elif all(set(m) == {"type"} and isinstance(m["type"], str) for m in members):
            names = sorted({m["type"] for m in members})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": members}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal:
        values = list(args)
        if not values or any(type(v) not in _JSON_SCALARS for v in values):
            raise ToolSchemaError(f"{where}: Literal values must be str, int, float, bool or None, got {hint!r}")
        kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}
    if origin is list:
        return {"type": "array", "items": hint_schema(args[0], where=where)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": hint_schema(args[0], where=where)}
        if Ellipsis in args:
            raise _unsupported(hint, where)
        return {"type": "array", "prefixItems": [hint_schema(a, where=where) for a in args]}
    if origin is dict:
        if args and args[0] is not str:
            raise ToolSchemaError(f"{where}: dict keys must be str (JSON object keys are strings), got {hint!r}")
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = hint_schema(args[1], where=where)
        return out
    raise _unsupported(hint, where)


def _unsupported(hint: Any, where: str) -> ToolSchemaError:
    return ToolSchemaError(
        f"{where}: type hint {hint!r} has no JSON-schema equivalent; supported: int, float, str, bool, None, "
        "Any, list[X], tuple[X, ...], tuple[X, Y], dict[str, X], Literal[...], Optional[X] / Union of these")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) of a Google-style docstring.

    The description is the first paragraph with its lines joined by spaces. Parameter
    descriptions come from an ``Args:`` (or ``Arguments:`` / ``Parameters:``) section:
    ``name: text`` or ``name (type): text`` lines, continued by lines indented deeper.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary = []
    for line in lines:
        if not line.strip() or _is_section_header(line):
            break
        summary.append(line.strip())
    return " ".join(summary), _args_section(lines)


def _is_section_header(line: str) -> bool:
    return bool(_SECTION_RE.match(line.strip()))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _args_section(lines: list[str]) -> dict[str, str]:
    start = next((i for i, line in enumerate(lines) if line.strip().lower() in _ARGS_HEADERS), None)
    if start is None:
        return {}
    header_indent, entry_indent = _indent(lines[start]), None
    out: dict[str, list[str]] = {}
    current = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent <= header_indent:  # the next section (or text) starts
            break
        if entry_indent is None:
            entry_indent = indent
        match = _ARG_LINE_RE.match(line.strip()) if indent <= entry_indent else None
        if match:
            current = match.group(1)
            out[current] = [match.group(2).strip()]
        elif current is not None:
            out[current].append(line.strip())
    return {name: " ".join(p for p in parts if p) for name, parts in out.items()}


def _introspection_target(fn: Callable) -> Callable:
    """The object whose signature hints and docstring describe ``fn`` (partials and
    callable instances delegate to their function / ``__call__``)."""
    if isinstance(fn, functools.partial):
        return _introspection_target(fn.func)
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return fn
    if callable(fn) and not isinstance(fn, type):
        return type(fn).__call__
    return fn


def _default_name(fn: Callable) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(target, "__name__", None) or type(target).__name__


def function_schema(fn: Callable, *, name: str | None = None, description: str | None = None) -> dict:
    """The function-calling JSON schema of ``fn``: {"type": "function", "function": {...}}.

    Args:
      fn: a function with type hints on every parameter (or a partial / callable instance).
      name: the tool's name (default: the function's ``__name__``).
      description: overrides the docstring's first paragraph.

    Raises:
      ToolSchemaError: a parameter has no type hint or an unsupported one, is ``*args`` /
        ``**kwargs`` / positional-only, or the name is not [A-Za-z0-9_.-]{1,64}.
    """
    return _describe(fn, name, description)[0]


def _describe(fn: Callable, name: str | None, description: str | None) -> tuple[dict, tuple[str, ...]]:
    """(schema, names of Optional parameters without a default)."""
    if not callable(fn):
        raise ToolSchemaError(f"a tool must be callable, got {type(fn).__name__}: {fn!r}")
    name = _default_name(fn) if name is None else name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ToolSchemaError(f"tool name {name!r} must match [A-Za-z0-9_.-]{{1,64}} (pass name=... for lambdas "
                              "and callables without a usable __name__)")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ToolSchemaError(f"tool {name!r}: cannot read the signature of {fn!r}: {e}") from None
    target = _introspection_target(fn)
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception as e:  # unresolvable forward references and the like
        raise ToolSchemaError(f"tool {name!r}: cannot resolve the type hints of {fn!r}: {type(e).__name__}: {e}") \
            from None
    if target is type(fn).__call__:  # a callable instance: its __call__'s own doc, else its class's
        doc = target.__doc__ or type(fn).__doc__  # (not inspect.getdoc: it inherits "Call self as a function.")
    else:
        doc = inspect.getdoc(target)
    summary, arg_docs = parse_docstring(doc)
    properties, required, fill_none = {}, [], []
    for p in signature.parameters.values():
        where = f"tool {name!r}, parameter {p.name!r}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolSchemaError(f"{where}: *args / **kwargs are not supported (tool arguments are named JSON "
                                  "fields); list every parameter")
        if p.kind is p.POSITIONAL_ONLY:
            raise ToolSchemaError(f"{where}: positional-only parameters are not supported (tools are called "
                                  "with keyword arguments)")
        if p.name not in hints:
            raise ToolSchemaError(f"{where}: missing type hint (every tool parameter needs one, e.g. `x: int`)")
        schema = hint_schema(hints[p.name], where=where)
        if p.name in arg_docs and arg_docs[p.name]:
            schema["description"] = arg_docs[p.name]
        properties[p.name] = schema
        if p.default is p.empty:
            (fill_none if schema.get("nullable") else required).append(p.name)
    function = {
        "name": name,
        "description": summary if description is None else description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }
    return {"type": "function", "function": function}, tuple(fill_none)


# ---------------------------------------------------------------------------- tools


def _import_attribute(module: str, qualname: str) -> Any:
    """``module.qualname`` (how a decorated Tool is pickled: by reference)."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True, eq=False)
class Tool:
    """A callable tool: its name, the Python function and its JSON schema.

    Attributes:
      name: the name the model calls it by.
      function: the Python callable (keyword arguments only).
      schema: {"type": "function", "function": {"name", "description", "parameters"}}.
      fill_none: Optional parameters without a default, passed as None when omitted.
    """

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]
    fill_none: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return self.schema["function"].get("description", "")

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments object."""
        return self.schema["function"]["parameters"]

    def complete_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """``arguments`` plus None for each omitted Optional parameter without a default."""
        out = dict(arguments)
        for key in self.fill_none:
            out.setdefault(key, None)
        return out

    def __call__(self, **arguments: Any) -> Any:
        return self.function(**self.complete_arguments(arguments))

    def __reduce__(self):
        # A Tool made by the @tool decorator replaces its function in the module, so the
        # function cannot be pickled by reference any more; the Tool itself can.
        module, qualname = getattr(self.function, "__module__", None), getattr(self.function, "__qualname__", "")
        if module and "<" not in qualname:
            try:
                if _import_attribute(module, qualname) is self:
                    return _import_attribute, (module, qualname)
            except (ImportError, AttributeError):
                pass
        return Tool, (self.name, self.function, self.schema, self.fill_none)


def make_tool(fn: Callable | Tool, name: str | None = None, *, description: str | None = None) -> Tool:
    """``fn`` as a Tool, its schema derived from the signature and docstring.

    A Tool is returned as is (or renamed when ``name`` / ``description`` is given).

    Raises:
      ToolSchemaError: see ``function_schema``.
    """
    if isinstance(fn, Tool):
        if (name is None or name == fn.name) and description is None:
            return fn
        fn = fn.function
    schema, fill_none = _describe(fn, name, description)
    return Tool(schema["function"]["name"], fn, schema, fill_none)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """``make_tool`` as a decorator: ``@tool`` or ``@tool(name="calc")``.

    The decorated name is bound to the Tool (callable with keyword arguments like the
    function); it still pickles by reference, so it runs in the sandbox worker.
    """
    if fn is None:
        return functools.partial(tool, name=name, description=description)
    return make_tool(fn, name, description=description)


class ToolRegistry(Mapping[str, Tool]):
    """Tools by name, in registration order; a duplicate name is an error.

    ``ToolRegistry([add, mul])`` or ``ToolRegistry({"plus": add})`` (names from keys).
    """

    def __init__(self, tools: Iterable[Callable | Tool] | Mapping[str, Callable | Tool] = ()):
        self._tools: dict[str, Tool] = {}
        if isinstance(tools, Mapping):
            for key, fn in tools.items():
                self.add(fn, name=key)
        else:
            if callable(tools):
                raise TypeError(f"tools must be a list or dict of functions, got the single callable {tools!r}; "
                                "wrap it in a list")
            for fn in tools:
                self.add(fn)

    def add(self, fn: Callable | Tool, *, name: str | None = None) -> Tool:
        """Register ``fn`` (a function or Tool) and return its Tool.

        Raises:
          ValueError: a tool of that name is already registered.
        """
        t = make_tool(fn, name)
        if t.name in self._tools:
            raise ValueError(f"duplicate tool name {t.name!r}: already registered for {self._tools[t.name].function!r},"
                             f" now also for {t.function!r}; pass name=... to register it under another name")
        self._tools[t.name] = t
        return t

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def schemas(self) -> list[dict]:
        """The JSON schemas, in registration order (what chat templates take as ``tools=``)."""
        return [t.schema for t in self._tools.values()]

    def __repr__(self) -> str:
        return f"ToolRegistry({list(self._tools)})"


def as_registry(tools: ToolRegistry | Iterable[Callable | Tool] | Mapping[str, Callable | Tool]) -> ToolRegistry:
    """``tools`` as a ToolRegistry (a registry is returned as is)."""
    return tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
