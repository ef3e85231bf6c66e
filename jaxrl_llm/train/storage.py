"""Pre-flight checks on the run folder: it can be written and has room for a checkpoint.

A run that cannot write its checkpoints should fail in the first second, not after an
hour of training: `TrainLoop` calls `prepare_output_dir` before any compute and
`check_free_space` with the size of the training state before the first step.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

# A checkpoint of the state takes about its in-memory size; the factor leaves room for
# orbax's temporary directory next to the kept ones, the HF export and metric files.
CHECKPOINT_HEADROOM = 2.0


class StorageError(OSError):
    """The output directory cannot be created, written, or is too full for a checkpoint."""


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def prepare_output_dir(output_dir: str | os.PathLike) -> Path:
    """Creates ``output_dir`` and proves it is writable (write + fsync + delete a probe).

    Raises:
      StorageError: naming ``output_dir`` and the OS reason (a path under a file, no
        permission, read-only or full file system).
    """
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(
            f"run.output_dir={str(path)!r} cannot be created: {err.strerror or err}. "
            "Expected a writable directory (or a path where one can be created)."
        ) from err
    probe = path / f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        # fsync so that a full or read-only disk fails here, not on the first checkpoint.
        with open(probe, "wb") as f:
            f.write(b"jaxrl_llm write probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise StorageError(
            f"run.output_dir={str(path)!r} is not writable: {err.strerror or err}. "
            "Checkpoints, metrics and config.yaml are written there; pick another directory "
            "or fix its permissions / free space."
        ) from err
    finally:
        probe.unlink(missing_ok=True)
    return path


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (arrays, numpy, ShapeDtypeStructs)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:  # typed PRNG keys: count their key data
            itemsize = getattr(dtype, "itemsize", 8) or 8
        total += int(np.prod(shape, dtype=np.int64)) * int(itemsize)
    return total


def check_free_space(
    output_dir: str | os.PathLike, state_bytes: int, headroom: float = CHECKPOINT_HEADROOM
) -> None:
    """Fails early when ``output_dir``'s disk cannot hold one more checkpoint.

    Needed = ``headroom`` × ``state_bytes`` (the params + optimizer state + RNG + ... pytree
    that each checkpoint stores).

    Raises:
      StorageError: naming ``output_dir``, the bytes needed and the bytes free.
    """
    needed = int(headroom * state_bytes)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise StorageError(
            f"run.output_dir={str(output_dir)!r} has {_format_bytes(free)} free but a "
            f"checkpoint needs about {_format_bytes(needed)} ({headroom:g} x the "
            f"{_format_bytes(state_bytes)} training state). Free some space or choose "
            "another output_dir."
        )
