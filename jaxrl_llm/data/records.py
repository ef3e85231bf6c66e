"""Records: loading and saving datasets as lists of dicts, from local sources only.

A *record* is one example as a ``dict`` (e.g. ``{"prompt": ..., "answer": ...}``).
``load_records`` reads them from

- a Python sequence of dicts (or a ``datasets.Dataset`` / ``DatasetDict`` object),
- a ``.jsonl`` file (one JSON object per line; blank lines skipped),
- a ``.json`` file (a list of objects, or an object mapping split names to lists),
- a ``.parquet`` file (read with ``pyarrow``),
- a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (read with ``datasets.load_from_disk``),

renames columns if asked, and checks that every record has the required fields.
``save_records`` writes ``.jsonl``/``.json``/``.parquet`` atomically (temporary file +
rename), so a crash never leaves a half-written dataset. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]
FILE_FORMATS = ("jsonl", "json", "parquet")


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt == "ndjson":
        fmt = "jsonl"
    if fmt not in FILE_FORMATS:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} (suffix {path.suffix!r}); expected one of "
            f"{FILE_FORMATS} or a directory saved by datasets.save_to_disk.")
    return fmt


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError, line: int | None = None) -> ValueError:
    """Names the file, the line and column of the first byte that is not UTF-8."""
    start = data.rfind(b"\n", 0, err.start) + 1
    if line is None:
        line = data.count(b"\n", 0, err.start) + 1
    bad = data[err.start:err.end].hex(" ")
    return ValueError(
        f"{path}: line {line}, column {err.start - start + 1} is not valid UTF-8 (byte(s) {bad}: "
        f"{err.reason}); expected UTF-8 text. Re-encode the file as UTF-8 (e.g. "
        f"`iconv -f latin1 -t utf-8`)."
    )


def read_jsonl(path: Path) -> list:
    """The JSON value of every non-blank line of ``path``; a line that is not UTF-8 or
    not JSON is a ValueError naming the file and the line."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, raw, e, line=lineno) from e
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno}).") from e
    return rows


def _pick_split(splits: Mapping[str, Any], split: str | None, where: str):
    names = sorted(splits)
    if split is None:
        if len(names) == 1:
            return splits[names[0]]
        raise ValueError(f"{where} has splits {names}; pass split=<one of them>.")
    if split not in splits:
        raise ValueError(f"split={split!r} not found in {where}; available splits: {names}.")
    return splits[split]


def _read_json(path: Path, split: str | None) -> list:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, e) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}, column {e.colno} is not valid JSON: {e.msg}.") from e
    if isinstance(data, Mapping):
        data = _pick_split(data, split, str(path))
    elif split is not None:
        raise ValueError(f"split={split!r} given but {path} holds a list, not splits.")
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a list of records (or splits of lists), got {type(data).__name__}.")
    return data


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _from_hf(obj, split: str | None, where: str) -> list:
    if hasattr(obj, "keys") and not hasattr(obj, "to_list"):  # DatasetDict
        obj = _pick_split({k: obj[k] for k in obj.keys()}, split, where)
    elif split is not None:
        raise ValueError(f"split={split!r} given but {where} is a single Dataset, not a DatasetDict.")
    return obj.to_list()


def _read_source(source, split: str | None) -> list:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"dataset path {str(path)!r} does not exist (only local files are read).")
        if path.is_dir():
            import datasets

            return _from_hf(datasets.load_from_disk(str(path)), split, str(path))
        fmt = _format_of(path, None)
        if fmt != "json" and split is not None:
            raise ValueError(f"split={split!r} given but {path} is a single {fmt} file.")
        if fmt == "json":
            return _read_json(path, split)
        return read_jsonl(path) if fmt == "jsonl" else _read_parquet(path)
    if hasattr(source, "to_list") or (hasattr(source, "keys") and hasattr(source, "column_names")):
        return _from_hf(source, split, type(source).__name__)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if split is not None:
            raise ValueError(f"split={split!r} given but the source is a list of records.")
        return list(source)
    raise ValueError(
        "source must be a local path (.jsonl/.json/.parquet file or a datasets directory), "
        f"a datasets.Dataset, or a list of dicts; got {type(source).__name__}.")


def rename_columns(record: Mapping[str, Any], columns: Mapping[str, str], index: int = 0) -> Record:
    """A copy of ``record`` with fields renamed by ``columns`` ({old_name: new_name}).

    Fields absent from the record are skipped. Renaming onto a field the record already
    has is an error (it would silently drop data).
    """
    out = dict(record)
    for old, new in columns.items():
        if old not in out or old == new:
            continue
        if new in out:
            raise ValueError(
                f"record {index}: cannot rename field {old!r} to {new!r}, which already exists; "
                f"fields present: {sorted(record)}.")
        out[new] = out.pop(old)
    return out


def validate_records(records: Sequence[Any], required: Iterable[str] = ()) -> None:
    """Checks records are dicts holding every field in ``required`` (not None).

    Raises:
      ValueError: the dataset is empty, a record is not a dict, or a record misses a
        required field (naming the record index, the field and the fields present).
    """
    if len(records) == 0:
        raise ValueError("dataset is empty: no records to load.")
    required = tuple(required)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i} must be a dict, got {type(rec).__name__}: {rec!r:.80}.")
        for field in required:
            if rec.get(field) is None:
                raise ValueError(
                    f"record {i} is missing required field {field!r} (or it is None); "
                    f"fields present: {sorted(rec)}.")


def load_records(
    source,
    required: Iterable[str] = ("prompt",),
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Record]:
    """Loads records from a local source and validates them.

    Args:
      source: a list of dicts, a ``datasets`` object, or a local path: ``.jsonl``,
        ``.json``, ``.parquet`` file or a ``save_to_disk`` directory.
      required: fields every record must have (after renaming), not None.
      split: which split to read from a ``DatasetDict`` directory or a JSON object of
        splits; may be omitted when there is a single split.
      columns: renames applied to every record first, ``{old_name: new_name}``
        (e.g. ``{"question": "prompt"}``).

    Returns:
      list of dicts (copies; the source is not modified).

    Raises:
      ValueError: unreadable/unknown source, unknown split, empty dataset, a record that
        is not a dict or that misses a required field.
    """
    raw = _read_source(source, split)
    validate_records(raw)  # dict check before renaming
    records = [rename_columns(r, columns or {}, i) for i, r in enumerate(raw)]
    validate_records(records, required)
    return records


def _to_jsonable(value):
    """numpy scalars/arrays → Python values for JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"value of type {type(value).__name__} is not JSON serialisable.")


def _mixed_columns(records) -> str:
    """Names the columns whose values mix Python types (what parquet cannot store)."""
    types: dict[str, set[str]] = {}
    for r in records:
        for k, v in r.items():
            if v is not None:
                types.setdefault(k, set()).add(type(v).__name__)
    mixed = {k: sorted(t) for k, t in types.items() if len(t) > 1}
    return f"columns with mixed types {mixed}; " if mixed else ""


def save_records(records: Sequence[Mapping[str, Any]], path, fmt: str | None = None) -> Path:
    """Writes records to ``path`` atomically (temporary file in the same folder + rename).

    Args:
      records: non-empty list of dicts.
      path: destination; the format comes from the suffix (``.jsonl``, ``.json``,
        ``.parquet``) unless ``fmt`` is given.
      fmt: "jsonl" | "json" | "parquet".

    Returns:
      the path written.
    """
    path = Path(path)
    fmt = _format_of(path, fmt)
    validate_records(list(records))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if fmt == "parquet":
            os.close(fd)
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pa.Table.from_pylist([dict(r) for r in records])
            except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
                raise ValueError(f"cannot write records as parquet: {_mixed_columns(records)}{e}; "
                                 "parquet needs one type per column (use .jsonl for mixed types).") from e
            pq.write_table(table, tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                if fmt == "jsonl":
                    for r in records:
                        f.write(json.dumps(r, ensure_ascii=False, default=_to_jsonable) + "\n")
                else:
                    json.dump([dict(r) for r in records], f, ensure_ascii=False, default=_to_jsonable)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
