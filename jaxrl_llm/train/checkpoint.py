"""Checkpointing with orbax: the whole training state (params, optimizer state, step,
RNG, data position, controller state) as one pytree plus a JSON side-car; keep-last-N,
asynchronous, atomic (orbax writes to a temporary directory and renames on commit)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxrl_llm.train.storage import StorageError


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state it is restored into (e.g. the run was
    saved with another model size)."""


def _path_name(path: tuple) -> str:
    """'params.model.layers.0.attn.q_proj.value': the same name whether the key is a dict
    key, a list index or an attribute (orbax's metadata turns all of them into dict keys)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'params.w': (shape, dtype)} for every leaf with a shape."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out[_path_name(path)] = (tuple(shape), str(getattr(leaf, "dtype", "?")))
    return out


def describe_mismatch(saved: Any, expected: Any, limit: int = 8) -> list[str]:
    """Human-readable differences between a checkpoint's metadata tree and the target.

    Lists leaves missing on either side and leaves whose shapes differ (dtypes are cast on
    restore, so they are not a mismatch).
    """
    saved_leaves, expected_leaves = _leaf_shapes(saved), _leaf_shapes(expected)
    lines = []
    for key in sorted(expected_leaves.keys() - saved_leaves.keys()):
        lines.append(f"{key}: expected {expected_leaves[key][0]}, not in the checkpoint")
    for key in sorted(saved_leaves.keys() - expected_leaves.keys()):
        lines.append(f"{key}: in the checkpoint {saved_leaves[key][0]}, not expected")
    for key in sorted(saved_leaves.keys() & expected_leaves.keys()):
        if saved_leaves[key][0] != expected_leaves[key][0]:
            lines.append(
                f"{key}: checkpoint has shape {saved_leaves[key][0]}, "
                f"the current config expects {expected_leaves[key][0]}"
            )
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _saved_state_metadata(step_dir: Path) -> Any:
    """The array metadata tree (shapes, dtypes) stored in ``step_dir/state``."""
    return ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")


@contextlib.contextmanager
def _storage_errors(action: str, directory: Path, latest_complete: int | None):
    """Re-raises OS errors of a checkpoint write (disk full, read-only) as StorageError
    naming the directory and the last complete checkpoint, which is left intact."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        keep = (
            f"the last complete checkpoint, step {latest_complete}, is intact and is what "
            "run.resume=true loads"
            if latest_complete is not None
            else "no complete checkpoint exists yet"
        )
        raise StorageError(
            f"{action} in {directory} failed: {err.strerror or err}; {keep}. Free disk space "
            "(or fix permissions) and resume."
        ) from err


class Checkpointer:
    """Saves and restores ``(state pytree, meta dict)`` under ``directory/<step>/``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _complete_steps(self) -> int | None:
        """Latest committed step read from disk (orbax's cached list may include a step
        whose asynchronous write then failed)."""
        steps = [
            int(p.name)
            for p in self.directory.glob("*")
            if p.name.isdigit() and (p / "state").is_dir() and (p / "meta").is_dir()
        ]
        return max(steps) if steps else None

    def save(self, step: int, state: Any, meta: dict | None = None, force: bool = False) -> None:
        with _storage_errors(f"writing checkpoint {step}", self.directory, self._complete_steps()):
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
                ),
                force=force,
            )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the structure/dtypes/shardings of ``abstract_state``.

        ``abstract_state`` may be the live initial state (its shapes are taken).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        # Compare shapes first: orbax's own error names neither the leaf nor the checkpoint,
        # and a failed restore leaves background reads behind.
        self._check_matches(step, target)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise self._mismatch_error(step, [f"{type(err).__name__}: {str(err)[:500]}"]) from err
        return restored["state"], dict(restored["meta"] or {})

    def _check_matches(self, step: int, target: Any) -> None:
        try:
            saved = _saved_state_metadata(self.directory / str(step))
        except Exception:  # noqa: BLE001 - unreadable metadata: let orbax's restore decide
            return
        diffs = describe_mismatch(saved, target)
        if diffs:
            raise self._mismatch_error(step, diffs)

    def _mismatch_error(self, step: int, details: list[str]) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"checkpoint {self.directory / str(step)} does not match the state being restored "
            "(was it saved with another model or optimizer config?):\n  " + "\n  ".join(details)
        )

    def wait(self) -> None:
        with _storage_errors("finishing a checkpoint write", self.directory, self._complete_steps()):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()
