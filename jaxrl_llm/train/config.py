"""Config files and command-line overrides for the frozen config dataclasses.

One dataclass per algorithm is both the Python API and the CLI: a YAML file gives a base,
``key=value`` overrides (dotted keys reach nested dataclasses) adjust it, and every run
writes the resolved config next to its outputs.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def config_to_dict(config: Any) -> dict:
    """A dataclass (nested dataclasses, tuples) → plain dict for YAML/JSON."""
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Converts a YAML-parsed value to the field's annotated type where unambiguous."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], name)
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"config field {name!r} expects a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{name}.")
    if origin is tuple or annotation is tuple:
        if isinstance(value, (int, float, str)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, name) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-2" (no dot) as a string; it is a float to anyone typing it.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ValueError(
            f"config field {name!r} expects {annotation.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Builds ``cls`` from a dict, rejecting unknown keys with the list of valid ones."""
    types_ = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(prefix + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {sorted(known)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``key=value`` strings (values parsed as YAML, dotted keys nest)."""
    data = dict(data)
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ValueError(
                f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it "
                "(key='\"text\"') or fix the brackets"
            ) from err
        node = data
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return data


def _read_yaml(path: Path) -> Any:
    """Parses YAML file ``path``; a syntax error names the file, line and column."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"config file {path}, line {line}: not valid UTF-8 ({err.reason}); expected UTF-8 text.") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
        raise ValueError(
            f"config file {path}{where}: not valid YAML ({problem or err}); expected a YAML mapping "
            "of config fields (key: value, nested by indentation with spaces)."
        ) from err


def load_config_dict(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """YAML file (optional) + ``key=value`` overrides → a plain dict (not yet typed)."""
    data: dict = {}
    if path is not None:
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return apply_overrides(data, list(overrides))


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> C:
    """YAML file (optional) + overrides → a validated frozen ``cls`` instance."""
    return from_dict(cls, load_config_dict(path, overrides))


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Writes the resolved config as YAML, atomically (write then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    os.replace(tmp, path)
    return path
