"""GGUF files (llama.cpp's format) → Hugging Face checkpoint folders that `load_hf` reads.

`convert_gguf(file.gguf, out_dir)` dequantises every tensor (Q4_1, Q8_0, F16, ...) to
float32 or bfloat16 and writes the folder `save_hf` would: model.safetensors,
config.json, generation_config.json and the tokenizer (tokenizer.json,
tokenizer_config.json with the chat template), plus a marker file naming its source.

The GGUF file is read with transformers (`from_pretrained(..., gguf_file=...)`), which
needs the optional packages gguf, accelerate and PyTorch: `pip install 'jaxrl-llm[gguf]'`
(PyTorch is only needed here, at conversion time; a CPU wheel is enough).

The folder is written into a temporary sibling and renamed into place, so a reader (or a
second process converting the same file) sees either no folder or a complete one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes  # also registers bfloat16 with numpy
import numpy as np

from jaxrl_llm.models.config import ModelConfig

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MARKER = "jaxrl_llm_gguf.json"  # written last into a conversion: {"source", "source_bytes", "dtype"}
DTYPES = ("float32", "bfloat16")
REQUIRED = {"gguf": "gguf", "accelerate": "accelerate", "torch": "torch"}  # module → pip name
INSTALL_HINT = "pip install 'jaxrl-llm[gguf]'"
# transformers' runtime keys that tokenizer.save_pretrained copies into tokenizer_config.json.
_LOAD_TIME_KEYS = ("is_local", "local_files_only")


class MissingDependencyError(ImportError):
    """An optional package a GGUF conversion (or a named model) needs is not installed."""


def require_gguf_deps() -> None:
    """Raises `MissingDependencyError` naming the missing packages and the install command."""
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        torch_hint = (" (PyTorch, used only to read the file: a CPU wheel is enough, e.g. "
                      "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
                      if "torch" in missing else "")
        raise MissingDependencyError(
            f"reading GGUF files needs the optional packages {missing}{torch_hint}: {INSTALL_HINT}")


def check_gguf_file(path: str | os.PathLike) -> Path:
    """`path` as a Path after checking it is a readable file that starts with b'GGUF'.

    Raises:
      FileNotFoundError: no such file (or a directory).
      ValueError: the file is not GGUF (naming it and its first bytes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"GGUF file {str(path)!r} {what}.")
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file: it starts with {head!r}, a GGUF file starts "
                         f"with {GGUF_MAGIC!r}.")
    return path


def is_conversion(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished `convert_gguf` output (its marker file)."""
    return (Path(folder) / MARKER).is_file()


def conversion_source(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a finished conversion in `folder` ({"source", "source_bytes", "dtype",
    ...}), or None when there is none or it is unreadable."""
    try:
        with open(Path(folder) / MARKER, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_out_dir(out: Path) -> None:
    """An output folder may be new, empty, or a previous conversion (which is replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a directory.")
    if any(out.iterdir()) and not is_conversion(out):
        raise FileExistsError(
            f"output directory {str(out)!r} is not empty and is not a previous GGUF conversion (no {MARKER}); "
            "give a new or empty directory.")


def _hf_dtype_kwargs(torch: Any) -> dict[str, Any]:
    """float32 weights from `from_pretrained`: transformers ≥ 4.56 names it `dtype`, older `torch_dtype`."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def read_gguf(path: Path) -> tuple[Any, Any]:
    """(transformers *ForCausalLM with float32 dequantised weights, its tokenizer) of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, **_hf_dtype_kwargs(torch))
    except (ValueError, KeyError, IndexError, EOFError, struct.error, NotImplementedError) as err:
        # a truncated file fails deep in the reader ("cannot reshape array ..."): name the file.
        raise ValueError(f"{str(path)!r}: transformers cannot read this GGUF file ({type(err).__name__}: {err}). "
                         "Is it complete (not a cut download), and of an architecture transformers reads?") from err
    return model, tokenizer


def hf_state_to_numpy(state: dict[str, Any], config: ModelConfig, dtype: str) -> dict[str, np.ndarray]:
    """A torch state dict as numpy tensors of `dtype` (HF names and [out, in] layouts kept);
    a tied lm_head (the embedding again) is dropped, as transformers' own save does."""
    out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    tensors = {}
    for key, value in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors[key] = np.ascontiguousarray(value.detach().float().cpu().numpy().astype(out_dtype))
    return tensors


def save_tokenizer_files(tokenizer: Any, folder: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) in `folder`.

    tokenizer_config.json also gets the chat template (transformers 5 writes it only to
    chat_template.jinja, which older readers ignore) and `PreTrainedTokenizerFast` as its
    class (transformers 5 writes `TokenizersBackend`, unknown to transformers 4)."""
    tokenizer.model_max_length = max_length  # GGUF tokenizers come with "unlimited" (1e30)
    tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in _LOAD_TIME_KEYS:
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(tokenizer, "chat_template", None):
        cfg["chat_template"] = tokenizer.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_checkpoint(gguf_path: Path, folder: Path, dtype: str) -> ModelConfig:
    """Every file of the conversion into the (empty) `folder`; the marker last."""
    from safetensors.numpy import save_file

    from jaxrl_llm.models.hf_io import generation_config

    hf_model, tokenizer = read_gguf(gguf_path)
    hf_config = {k: v for k, v in hf_model.config.to_dict().items() if k != "quantization_config"}
    try:
        config = ModelConfig.from_hf(hf_config)
    except ValueError as err:
        raise ValueError(f"{str(gguf_path)!r}: {err}") from err
    save_file(hf_state_to_numpy(hf_model.state_dict(), config, dtype), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    del hf_model
    # our config.to_hf(): the keys load_hf / save_hf use, rope_theta included for transformers 4.
    config_json = {**config.to_hf(), "dtype": dtype}
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    gen = generation_config(config, tokenizer)
    if gen is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    save_tokenizer_files(tokenizer, folder, config.max_position_embeddings)
    marker = {"source": str(gguf_path.resolve()), "source_bytes": gguf_path.stat().st_size, "dtype": dtype,
              "model_type": config.model_type}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return config


def write_atomically(out: Path, write: Callable[[Path], Any], *, overwrite: bool) -> Path:
    """Runs `write(tmp)` on a fresh temporary sibling folder of `out`, then renames it to `out`.

    `out` may be missing or empty. If it holds a finished conversion by then (an earlier
    run, or a concurrent process that finished first): `overwrite` swaps ours in (two
    renames), otherwise ours is discarded and theirs kept. The temporary folder never
    outlives the call.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        try:
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # os.rename replaces an empty folder on POSIX only
            os.rename(tmp, out)  # atomic; fails when `out` exists and is not empty
            return out
        except OSError as err:
            if not is_conversion(out):
                raise FileExistsError(f"cannot move the conversion into {str(out)!r} ({err}); something else "
                                      "was written there meanwhile.") from err
        if overwrite:
            old = tmp.with_name(tmp.name + "-old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", *,
                 overwrite: bool = True) -> Path:
    """Converts a GGUF file into a HF checkpoint folder (`load_hf` / `load_tokenizer` /
    transformers read it).

    Args:
      gguf_path: a .gguf file of a supported family (llama, mistral, qwen2, qwen3, ...).
      out_dir: the folder to write: new, empty, or a previous conversion (replaced when
        `overwrite`, else kept as is).
      dtype: "float32" (exact dequantised values) or "bfloat16" (half the size).

    Returns:
      `out_dir` as a Path, holding model.safetensors, config.json, generation_config.json,
      tokenizer.json, tokenizer_config.json (+ chat_template.jinja) and the `MARKER` file.

    Raises:
      FileNotFoundError / ValueError: the file is missing or not GGUF; its architecture is
        not supported (both naming the file); an unknown dtype.
      FileExistsError: `out_dir` is a file, or a non-empty folder that is not a conversion.
      MissingDependencyError: gguf / accelerate / torch are not installed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}.")
    gguf_path = check_gguf_file(gguf_path)
    out = Path(out_dir).expanduser()
    _check_out_dir(out)  # before the slow part
    require_gguf_deps()
    return write_atomically(out, lambda tmp: _write_checkpoint(gguf_path, tmp, dtype), overwrite=overwrite)
