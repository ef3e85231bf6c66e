"""Checkpointing with orbax: the whole training state (params, optimizer state, step,
RNG, data position, controller state) as one pytree plus a JSON side-car; keep-last-N,
asynchronous, atomic (orbax writes to a temporary directory and renames on commit).

Damage is told apart from a config mismatch. A checkpoint whose files are truncated,
empty or missing, or whose arrays read back with other values than were saved (checked
against checksums stored in the side-car, see ``checksums.py``: orbax keeps none)
(``CheckpointDamagedError``) is skipped by ``restore_latest``, which
falls back to the newest checkpoint that restores and moves the damaged ones aside
(``<step>.damaged-<time>``: kept as evidence, invisible to orbax's step listing). A
checkpoint that reads fine but holds another tree or other shapes
(``CheckpointMismatchError``) is an error naming each leaf: older checkpoints of the same
run would not fit either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxrl_llm.train.checksums import checksum_mismatches, tree_checksums
from jaxrl_llm.train.storage import DAMAGED_MARKER, StorageError, damaged_checkpoints  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# side-car key holding the state's checksums (``checksums.tree_checksums``)
CHECKSUMS_KEY = "_state_checksums"

# How long a failed asynchronous save may take to wind down its background threads before
# they are abandoned (orbax would otherwise keep the process alive for its 300 s timeout).
ABANDON_TIMEOUT_S = 10.0


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state it is restored into (e.g. the run was
    saved with another model size)."""


class CheckpointDamagedError(OSError):
    """A checkpoint's files are damaged (truncated, empty, missing or undecodable), so it
    cannot be restored; ``damaged`` lists ``(step, reason)`` of each checkpoint tried."""

    def __init__(self, message: str, damaged: list[tuple[int, str]] = ()):
        super().__init__(message)
        self.damaged = list(damaged)

    def __str__(self) -> str:  # OSError's str of a single argument, without errno clutter
        return str(self.args[0]) if self.args else ""


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
    layout = _layout_hint(saved_leaves.keys(), expected_leaves.keys())
    return [layout, *lines] if layout else lines


def _decoder_layout(keys) -> str | None:
    if any(".stacks." in k for k in keys):
        return "stacked (scan_layers=True)"
    if any(".layers." in k for k in keys):
        return "per layer (scan_layers=False)"
    return None


def _layout_hint(saved_keys, expected_keys) -> str | None:
    """The likely cause when the two trees store the decoder in different layouts."""
    saved, expected = _decoder_layout(saved_keys), _decoder_layout(expected_keys)
    if saved and expected and saved != expected:
        return (
            f"the checkpoint stores the decoder {saved}, the model being restored {expected}: "
            "build the model in the checkpoint's layout (load_hf(..., scan_layers=...), CLI "
            "--scan-layers; or models.stack_layers / unstack_layers)"
        )
    return None


def _saved_state_metadata(step_dir: Path) -> Any:
    """The array metadata tree (shapes, dtypes) stored in ``step_dir/state``."""
    return ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")


# ---------------------------------------------------------------------------- damage


def _json_problem(path: Path, step_dir: Path, required: bool) -> list[str]:
    name = str(path.relative_to(step_dir))
    if not path.is_file():
        return [f"{name} is missing"] if required else []
    raw = path.read_bytes()
    if not raw.strip():
        return [f"{name} is empty ({len(raw)} bytes)"]
    try:
        json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return [f"{name} is truncated or corrupt: not valid JSON ({err}; {len(raw)} bytes)"]
    return []


def scan_step_dir(step_dir: str | os.PathLike) -> list[str]:
    """Damage to checkpoint ``step_dir`` visible without reading its arrays: a missing
    ``state/`` or ``meta/`` item, a missing, empty or unparsable JSON file (``meta/metadata``,
    ``state/_METADATA``, ``state/array_metadatas/*``), a missing ``state/manifest.ocdbt`` (the index of the array
    files), an empty array file. Each entry names the file (relative to ``step_dir``).
    Truncated or missing array data shows up only when the arrays are read (see
    ``Checkpointer.restore``)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir} is not a directory"]
    problems = []
    for item, what in (("state", "the arrays"), ("meta", "the JSON side-car")):
        if not (step_dir / item).is_dir():
            problems.append(f"{item}/ ({what}) is missing")
    if (step_dir / "meta").is_dir():
        problems += _json_problem(step_dir / "meta" / "metadata", step_dir, required=True)
    state = step_dir / "state"
    if state.is_dir():
        problems += _json_problem(state / "_METADATA", step_dir, required=False)
        for f in sorted((state / "array_metadatas").glob("*")):
            if f.is_file():
                problems += _json_problem(f, step_dir, required=False)
        if any(state.glob("ocdbt.process_*")) and not (state / "manifest.ocdbt").is_file():
            problems.append("state/manifest.ocdbt (the index of the array files) is missing")
        for f in sorted(state.rglob("*")):
            if f.is_file() and (f.parent.name == "d" or f.name == "manifest.ocdbt") and f.stat().st_size == 0:
                problems.append(f"{f.relative_to(step_dir)} is empty (0 bytes)")
    return problems


# TensorStore status codes of a read that found damaged or missing data (not of a
# resource problem such as RESOURCE_EXHAUSTED, which is re-raised as it is).
_DAMAGE_CODES = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION")
_DAMAGE_HINTS = (
    ("Requested byte range", "an array file is truncated"),
    ("Truncated", "an array file is truncated or missing"),
    ("Error decoding", "a file is corrupt"),
    ("NOT_FOUND", "a file is missing"),
    ("DATA_LOSS", "a file is corrupt"),
)


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def _short(message: str, limit: int = 400) -> str:
    message = message.split(" [tensorstore_spec", 1)[0].split("\n", 1)[0]
    message = message.replace('Error opening "cast" driver: ', "").replace('Error opening "zarr" driver: ', "")
    return message if len(message) <= limit else message[: limit - 3] + "..."


def damage_reason(err: BaseException) -> str | None:
    """Why restoring failed when the failure is damage to the checkpoint's files (a
    truncated or missing array file, unparsable metadata, a missing item); None for any
    other failure (a shape mismatch, out of memory, ...)."""
    for e in reversed(_exception_chain(err)):  # innermost first: the most specific
        message = str(e)
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            return f"a metadata file is truncated or corrupt: not valid JSON ({_short(message)})"
        if isinstance(e, FileNotFoundError):
            return f"a file is missing ({_short(message)})"
        if isinstance(e, KeyError) and "was not found in the checkpoint" in message:
            return f"an item is missing ({_short(message.strip(chr(34) + chr(39)))})"
        code = re.match(r"^([A-Z_]+): ", message)
        if code and code.group(1) in _DAMAGE_CODES:
            hint = next((h for key, h in _DAMAGE_HINTS if key in message), "a file is unreadable")
            return f"{hint} ({_short(message)})"
    return None


# ---------------------------------------------------------------------------- storage errors


@contextlib.contextmanager
def _storage_errors(action: str, directory: Path, latest_complete, on_error=None):
    """Re-raises OS errors of a checkpoint write (disk full, read-only) as StorageError
    naming the directory and the last complete checkpoint, which is left intact.
    ``on_error`` runs first on any failure (it abandons the failed save's threads)."""
    try:
        yield
    except Exception as err:
        if on_error is not None:
            on_error()
        reason = None if isinstance(err, StorageError) else _write_failure(err)
        if reason is None:
            raise
        complete = latest_complete()
        keep = (
            f"the last complete checkpoint, step {complete}, is intact and is what "
            "run.resume=true loads"
            if complete is not None
            else "no complete checkpoint exists yet"
        )
        raise StorageError(
            f"{action} in {directory} failed: {reason}; {keep}. Free disk space "
            "(or fix permissions) and resume."
        ) from err


# TensorStore status codes of a failed file write (orbax raises them as ValueError).
_WRITE_FAILURE_CODES = ("NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED",
                        "DATA_LOSS", "UNAVAILABLE", "ABORTED", "OUT_OF_RANGE")


def _write_failure(err: BaseException) -> str | None:
    """The OS reason of a failed checkpoint write ("No space left on device", "Not a
    directory", ...): an OSError in the chain, or a TensorStore write error (a ValueError
    carrying a status code and the OS error number); None for anything else."""
    for e in _exception_chain(err):
        if isinstance(e, OSError) and not isinstance(e, TimeoutError):
            return e.strerror or str(e)
    for e in _exception_chain(err):
        message = str(e)
        number = re.search(r"os_error_code='?(\d+)", message)
        if number:
            return f"{os.strerror(int(number.group(1)))} ({_short(message, 300)})"
        code = re.match(r"^([A-Z_]+): ", message)
        if code and code.group(1) in _WRITE_FAILURE_CODES:
            return _short(message, 300)
    return None


def _abandon_orbax_threads(operation_ids: set[str], timeout: float = ABANDON_TIMEOUT_S) -> int:
    """Cancels orbax's background save threads of ``operation_ids`` and releases the
    signals they wait for (in one process), then joins them for at most ``timeout`` s.

    A save whose step directory could not be created leaves threads waiting for a
    "directory created" signal that never comes; they are not daemons, so the process
    would linger for orbax's 300 s coordination timeout after the error. Returns the
    number of threads still alive."""
    try:
        from orbax.checkpoint._src.futures import future as ocp_future
    except ImportError:  # another orbax layout: nothing to abandon
        return 0
    thread_cls = getattr(ocp_future, "_SignalingThread", None)
    if thread_cls is None:
        return 0
    threads = [
        t for t in threading.enumerate()
        if isinstance(t, thread_cls) and t.is_alive() and getattr(t, "_operation_id", None) in operation_ids
    ]
    for t in threads:
        try:
            t.cancel()
            if jax.process_count() == 1:  # the signals are process-local: release the wait
                ocp_future.set_signals(getattr(t, "_receive_signals", ()), operation_id=t._operation_id)
        except Exception as err:  # noqa: BLE001 - best effort on private orbax API
            logger.debug("could not cancel orbax thread %s: %s", t.name, err)
    deadline = time.monotonic() + timeout
    for t in threads:
        threading.Thread.join(t, max(0.0, deadline - time.monotonic()))  # its own join re-raises
    alive = [t for t in threads if t.is_alive()]
    if alive:
        logger.warning(
            "%d background checkpoint thread(s) of the failed save are still running (%s); the "
            "process may wait for them before it exits", len(alive), ", ".join(t.name for t in alive),
        )
    return len(alive)


_QUIET_HOOK_INSTALLED = False


def _quiet_abandoned_reads() -> None:
    """After a restore failed on damaged files, orbax's other reads of that checkpoint
    finish into a closed event loop and Python prints their exceptions as "Exception
    ignored in: <coroutine _read_array_index_and_device_put>" / "Event loop is closed"
    tracebacks, long after the clear error. Installs (once) a ``sys.unraisablehook``
    filter that logs exactly those at debug level; anything else reaches the previous hook."""
    global _QUIET_HOOK_INSTALLED
    if _QUIET_HOOK_INSTALLED:
        return
    import sys

    previous = sys.unraisablehook

    def hook(unraisable):
        value, obj = unraisable.exc_value, repr(unraisable.object)
        if "_read_array_index_and_device_put" in obj or (
            isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        ):
            logger.debug("abandoned checkpoint read: %s", _short(str(value)))
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _QUIET_HOOK_INSTALLED = True


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (one process: ``ok``)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok], dtype=np.int32))))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Saves and restores ``(state pytree, meta dict)`` under ``directory/<step>/``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._operation_ids: set[str] = set()
        self._failed = False

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

    def _abandon(self) -> None:
        """A save failed: let go of its background threads so the process can exit now."""
        self._failed = True
        _abandon_orbax_threads(self._operation_ids)

    def save(self, step: int, state: Any, meta: dict | None = None, force: bool = False) -> None:
        """Writes ``state`` and the JSON ``meta`` (plus the state's checksums) as ``step``."""
        meta = {**(meta or {}), CHECKSUMS_KEY: tree_checksums(state)}
        with _storage_errors(f"writing checkpoint {step}", self.directory, self._complete_steps, self._abandon):
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
            self._operation_ids.add(_current_operation_id())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the structure/dtypes/shardings of ``abstract_state``.

        ``abstract_state`` may be the live initial state (its shapes are taken). With
        several processes, every process must call it; they agree on the outcome (a read
        that fails on one process is damage for all of them).

        Raises:
          CheckpointDamagedError: the checkpoint's files are damaged (names the file or
            the read error), or the arrays read back differ from the ones saved (their
            checksums, kept in the side-car, do not match: bytes changed in place).
          CheckpointMismatchError: it reads, but holds another tree or other shapes.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        damage = None
        try:
            state, meta = self._read(step, target)
        except CheckpointDamagedError as err:
            damage = err
        # Each process reads its own shards, so one may fail where the others succeed;
        # all must take the same path (the checksums below are collective sums).
        if not _all_processes_agree(damage is None):
            raise damage or self._damaged_error(step, "damaged on another process (see that process's log)")
        saved_checksums = meta.pop(CHECKSUMS_KEY, None)  # absent in checkpoints of older versions
        if saved_checksums:
            changed = checksum_mismatches(saved_checksums, state)
            if changed:
                raise self._damaged_error(
                    step, f"the arrays read back differ from the ones saved (checksum mismatch in "
                          f"{', '.join(changed)}): bytes of an array file were changed on disk")
        return state, meta

    def _read(self, step: int, target: Any) -> tuple[Any, dict]:
        """This process's read of checkpoint ``step``: (state, meta with checksums).

        Reads the items with orbax's handlers rather than ``CheckpointManager.restore``,
        whose closing barrier would leave the other processes waiting when this one fails.
        """
        step_dir = self.directory / str(step)
        problems = scan_step_dir(step_dir)
        if problems:
            raise self._damaged_error(step, "; ".join(problems))
        # Compare shapes first: orbax's own error names neither the leaf nor the checkpoint,
        # and a failed restore leaves background reads behind.
        self._check_matches(step, target)
        handler = ocp.StandardCheckpointHandler()
        try:
            state = handler.restore(epath.Path(step_dir) / "state", args=ocp.args.StandardRestore(target))
        except Exception as err:
            reason = damage_reason(err)
            if reason is not None:
                _quiet_abandoned_reads()
                raise self._damaged_error(step, reason) from err
            if isinstance(err, (ValueError, KeyError, TypeError)):
                raise self._mismatch_error(step, [f"{type(err).__name__}: {str(err)[:500]}"]) from err
            raise
        finally:
            handler.close()
        meta = json.loads((step_dir / "meta" / "metadata").read_text())  # parsed by scan_step_dir already
        return state, dict(meta or {})

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int | None, list[tuple[int, str]]]:
        """Restores the newest checkpoint that restores, skipping damaged ones.

        Each damaged checkpoint newer than the one restored is logged (a warning naming it
        and the damage) and moved aside to ``<step>.damaged-<time>`` (see ``move_aside``).

        Returns:
          (state, meta, step, damaged): ``step`` None (and ``abstract_state`` back) when
          there is no checkpoint; ``damaged`` the ``(step, reason)`` skipped.

        Raises:
          CheckpointDamagedError: no checkpoint restores (names each and its damage);
            nothing is moved.
          CheckpointMismatchError: a checkpoint reads but does not fit ``abstract_state``
            (a config change, not damage: older checkpoints of the run would not fit either).
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(abstract_state, step)  # the processes agree on the outcome
            except CheckpointDamagedError as err:
                damaged.append((step, err.damaged[0][1]))
                continue
            for bad_step, why in damaged:
                moved = self.move_aside(bad_step, why)
                logger.warning(
                    "checkpoint %s is damaged: %s. Skipped it and resumed from checkpoint %d; "
                    "moved it aside to %s", self.directory / str(bad_step), why, step, moved,
                )
            if damaged:
                self._manager.reload()
            return state, meta, step, damaged
        if damaged:
            lines = "\n  ".join(f"{self.directory / str(s)}: {why}" for s, why in damaged)
            raise CheckpointDamagedError(
                f"no checkpoint in {self.directory} can be restored; each one is damaged:\n  {lines}\n"
                "Nothing was moved or deleted. Restore the files from a copy, or start afresh "
                "with run.overwrite=true (or a new run.output_dir).",
                damaged,
            )
        return abstract_state, {}, None, []

    def move_aside(self, step: int, reason: str = "") -> Path | None:
        """Renames damaged checkpoint ``step`` to ``<step>.damaged-<time>`` in the same
        folder (kept as evidence; orbax's step listing ignores the name) with a
        ``DAMAGED.txt`` giving ``reason``. Process 0 renames; all processes wait for it.
        Returns the new path (None on other processes)."""
        moved = None
        if jax.process_index() == 0:
            source = self.directory / str(step)
            stamp = time.strftime("%Y%m%dT%H%M%S")
            moved = self.directory / f"{step}{DAMAGED_MARKER}{stamp}"
            n = 1
            while moved.exists():
                moved = self.directory / f"{step}{DAMAGED_MARKER}{stamp}-{n}"
                n += 1
            try:
                os.replace(source, moved)
            except OSError as err:
                raise StorageError(
                    f"checkpoint {source} is damaged ({reason}) and could not be moved aside to "
                    f"{moved.name}: {err.strerror or err}. The run cannot write its checkpoints "
                    "there either; fix the folder's permissions, or move it yourself, and resume."
                ) from err
            if reason:
                with contextlib.suppress(OSError):
                    (moved / "DAMAGED.txt").write_text(f"skipped on resume: {reason}\n")
        _sync_processes(f"jaxrl_llm.Checkpointer.move_aside.{step}")
        return moved

    def _check_matches(self, step: int, target: Any) -> None:
        try:
            saved = _saved_state_metadata(self.directory / str(step))
        except Exception:  # noqa: BLE001 - unreadable metadata: let orbax's restore decide
            return
        diffs = describe_mismatch(saved, target)
        if diffs:
            raise self._mismatch_error(step, diffs)

    def _damaged_error(self, step: int, reason: str) -> CheckpointDamagedError:
        return CheckpointDamagedError(
            f"checkpoint {self.directory / str(step)} is damaged: {reason}", [(step, reason)]
        )

    def _mismatch_error(self, step: int, details: list[str]) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"checkpoint {self.directory / str(step)} does not match the state being restored "
            "(was it saved with another model or optimizer config?):\n  " + "\n  ".join(details)
        )

    def check_for_errors(self) -> None:
        """Raises ``StorageError`` now if an asynchronous save has already failed (instead
        of at the next save, ``checkpoint_every`` steps later). Never blocks."""
        finalize = getattr(self._manager, "_finalize_thread", None)  # orbax internals, best effort
        try:
            failed = finalize is not None and finalize.map(
                lambda t: t is not None and not t.is_alive() and t.exception is not None
            )
        except Exception:  # noqa: BLE001 - another orbax layout: rely on the next save
            return
        if failed:
            try:
                step = finalize.map(lambda t: t.step())
            except Exception:  # noqa: BLE001
                step = None
            self.wait(f"writing checkpoint {step} (in the background)" if step is not None else None)

    def wait(self, action: str | None = None) -> None:
        action = action or "finishing a checkpoint write"
        with _storage_errors(action, self.directory, self._complete_steps, self._abandon):
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._failed:  # a save failed and raised; its threads were abandoned
            return
        self.wait()
        self._manager.close()


def _current_operation_id() -> str | None:
    """orbax's id of the save just started (its background threads carry it)."""
    try:
        from orbax.checkpoint._src.futures import synchronization

        return synchronization.OperationIdGenerator.get_current_operation_id()
    except (ImportError, AttributeError):
        return None
