"""Pre-flight checks on the run folder: it can be written and has room for a checkpoint;
and what of a run it already holds (``describe_run_outputs``), cleared for
``run.overwrite`` (``clear_run_outputs``: only what a run writes).

A run that cannot write its checkpoints should fail in the first second, not after an
hour of training: `TrainLoop` calls `prepare_output_dir` (the run folder) and
`prepare_checkpoint_dir` (its ``checkpoints/``, which may be a link to another disk)
before any compute, and `check_free_space` on both with the size of the training state
before the first step.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

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


def _probe_writable(path: Path, name: str, purpose: str) -> None:
    """Writes, fsyncs and deletes a probe file in ``path``; ``StorageError`` naming
    ``name`` (how the user knows the folder) and the OS reason when that fails."""
    probe = path / f"{_PROBE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        # fsync so that a full or read-only disk fails here, not on the first checkpoint.
        with open(probe, "wb") as f:
            f.write(b"jaxrl_llm write probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise StorageError(
            f"{name}={str(path)!r} is not writable: {err.strerror or err}. {purpose}; pick "
            "another directory or fix its permissions / free space."
        ) from err
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


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
    _probe_writable(path, "run.output_dir", "Checkpoints, metrics and config.yaml are written there")
    return path


def prepare_checkpoint_dir(checkpoints_dir: str | os.PathLike) -> Path:
    """Creates the run's ``checkpoints/`` folder (or follows its link) and proves it is
    writable, like `prepare_output_dir`: it may live on another disk than the run folder
    (a symlink), and a checkpoint that cannot be written should fail before any compute.

    Raises:
      StorageError: naming the checkpoint folder and the OS reason.
    """
    path = Path(checkpoints_dir)
    try:
        # a link to a folder not created yet: create its target
        (path.resolve() if path.is_symlink() else path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(
            f"checkpoint folder {str(path)!r} cannot be created: {err.strerror or err}. Expected a "
            "writable directory (a link to one is fine); checkpoints are written there."
        ) from err
    _probe_writable(path, "checkpoint folder", "Every checkpoint is written there")
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
    output_dir: str | os.PathLike,
    state_bytes: int,
    headroom: float = CHECKPOINT_HEADROOM,
    name: str = "run.output_dir",
) -> None:
    """Fails early when ``output_dir``'s disk cannot hold one more checkpoint.

    Needed = ``headroom`` × ``state_bytes`` (the params + optimizer state + RNG + ... pytree
    that each checkpoint stores).

    Args:
      name: how the error names the folder (``"run.output_dir"``, ``"checkpoint folder"``).

    Raises:
      StorageError: naming ``output_dir``, the bytes needed and the bytes free.
    """
    needed = int(headroom * state_bytes)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise StorageError(
            f"{name}={str(output_dir)!r} has {_format_bytes(free)} free but a "
            f"checkpoint needs about {_format_bytes(needed)} ({headroom:g} x the "
            f"{_format_bytes(state_bytes)} training state). Free some space or choose "
            "another output_dir."
        )


# ---------------------------------------------------------------------------- run folder
#
# A run folder belongs to one run. What a run writes into its output_dir — and so the
# only things ``run.overwrite=true`` ever deletes; any other file is left alone.
RUN_OUTPUT_FILES = (
    "config.yaml",  # TrainLoop: the resolved config
    "metrics.jsonl",  # TrainLoop: one row per step
    "data_stats.json",  # dpo.DATA_STATS
    "reference_logprobs.npz",  # dpo.REFERENCE_CACHE
    # temporaries of the atomic writes above (left behind by a kill mid-write)
    "config.yaml.tmp",
    "metrics.tmp",
    "reference_logprobs.tmp.npz",
)
RUN_OUTPUT_DIRS = (
    "checkpoints",  # TrainLoop: orbax checkpoints, one folder per step
    "tensorboard",  # TrainLoop (run.tensorboard): event files
    "export",  # TrainLoop.finish (run.export_hf): the Hugging Face export
    "reward_model",  # reward_model.train (save_hf)
    "rft",  # rft.train: each iteration's kept samples
)
# TensorBoard event files written straight into the run folder (older layouts).
RUN_OUTPUT_PATTERNS = ("events.out.tfevents.*",)
_PROBE_PREFIX = ".write_probe_"


def _has_content(path: Path) -> bool:
    """A non-empty file, or a folder holding anything (a symlink counts as content)."""
    if path.is_symlink():
        return True
    if path.is_dir():
        return any(path.iterdir())
    return path.is_file() and path.stat().st_size > 0


def _run_entries(path: Path) -> list[Path]:
    """The run outputs present in ``path`` (empty files / folders included)."""
    if not path.is_dir():
        return []
    first = {"checkpoints": 0, "metrics.jsonl": 1, "config.yaml": 2}  # the most telling first
    names = sorted({*RUN_OUTPUT_FILES, *RUN_OUTPUT_DIRS}, key=lambda n: (first.get(n, len(first)), n))
    entries = [path / n for n in names if (path / n).exists() or (path / n).is_symlink()]
    for pattern in RUN_OUTPUT_PATTERNS:
        entries += sorted(p for p in path.glob(pattern) if p not in entries)
    return entries


def checkpoint_steps(checkpoints_dir: Path) -> list[int]:
    """Steps of the (complete or not) orbax checkpoints in ``checkpoints_dir``."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints_dir.iterdir() if p.name.isdigit() and p.is_dir())


# A damaged checkpoint skipped on resume is renamed ``<step>.damaged-<time>`` (evidence kept;
# orbax's step listing, which wants a bare number, ignores it).
DAMAGED_MARKER = ".damaged-"


def damaged_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints moved aside as damaged in ``checkpoints_dir``."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        p for p in checkpoints_dir.iterdir() if DAMAGED_MARKER in p.name and p.name.split(".", 1)[0].isdigit()
    )


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def describe_run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """What of an earlier run ``output_dir`` holds, e.g. ``["checkpoints at steps [20, 40]",
    "metrics.jsonl with 40 rows", "config.yaml"]``; empty files and folders are not
    counted, so ``[]`` means the folder can start a fresh run."""
    path = Path(output_dir)
    out = []
    for entry in _run_entries(path):
        if not _has_content(entry):
            continue
        name = entry.name
        if name == "checkpoints" and entry.is_dir() and not entry.is_symlink():
            steps = checkpoint_steps(entry)
            text = f"checkpoints at steps {steps}" if steps else "checkpoints/ (no complete checkpoint)"
            damaged = damaged_checkpoints(entry)
            if damaged:
                text += f" (+ {len(damaged)} damaged, moved aside: {', '.join(p.name for p in damaged)})"
            out.append(text)
        elif name == "metrics.jsonl" and entry.is_file():
            rows = _count_lines(entry)
            out.append(f"metrics.jsonl with {rows} row{'s' if rows != 1 else ''}")
        elif entry.is_dir():
            out.append(f"{name}/")
        else:
            out.append(name)
    return out


def _looks_like_run_folder(path: Path) -> bool:
    """True when ``path`` was written by a run: a config.yaml holding a ``run`` mapping, a
    metrics.jsonl whose first row has a step, or orbax step folders in checkpoints/."""
    config = path / "config.yaml"
    if config.is_file():
        try:
            data = yaml.safe_load(config.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("run"), dict):
            return True
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        try:
            with open(metrics) as f:
                first = json.loads(f.readline())
            if isinstance(first, dict) and "step" in first:
                return True
        except (ValueError, OSError, UnicodeDecodeError):
            pass
    checkpoints = path / "checkpoints"
    return checkpoints.is_dir() and not checkpoints.is_symlink() and any(
        (path / "checkpoints" / str(s) / "meta").is_dir() for s in checkpoint_steps(checkpoints)
    )


def _protected_folders() -> list[Path]:
    """Folders never cleared: the file-system root, the home folder and its ancestors."""
    home = Path.home().resolve()
    return [Path(home.anchor), home, *home.parents]


def check_clearable(output_dir: str | os.PathLike) -> list[Path]:
    """The run outputs ``clear_run_outputs`` would delete; raises ``ValueError`` (deleting
    nothing) when ``output_dir`` does not look like a run folder.

    Refused: the file-system root, the home folder or one of its ancestors, a folder that
    holds the current working directory, and a folder with run-output names (e.g. an
    ``export/`` of its own) but no sign of a run (see ``_looks_like_run_folder``).
    """
    path = Path(output_dir)
    resolved = path.resolve()
    if resolved in _protected_folders():
        raise ValueError(
            f"run.overwrite=true refuses to clear run.output_dir={str(path)!r}: it is {resolved}, "
            "not a run folder. Choose a dedicated output_dir."
        )
    cwd = Path.cwd().resolve()
    if resolved in cwd.parents:
        raise ValueError(
            f"run.overwrite=true refuses to clear run.output_dir={str(path)!r}: it holds the "
            f"current working directory {cwd}. Choose a dedicated output_dir."
        )
    entries = _run_entries(path)
    if any(_has_content(e) for e in entries) and not _looks_like_run_folder(path):
        raise ValueError(
            f"run.overwrite=true refuses to clear run.output_dir={str(path)!r}: it holds "
            f"{', '.join(describe_run_outputs(path))} but no config.yaml, metrics.jsonl or "
            "checkpoint of a run, so it does not look like a run folder. Delete those by hand "
            "if they can go, or choose another output_dir."
        )
    return entries


def clear_run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Deletes the run outputs in ``output_dir`` (``RUN_OUTPUT_FILES`` / ``_DIRS`` /
    ``_PATTERNS``; a symlink is unlinked, never followed) and returns the names of the
    entries left in place (files that are no run's). See ``check_clearable`` for the
    folders it refuses."""
    path = Path(output_dir)
    entries = check_clearable(path)
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(_PROBE_PREFIX))
