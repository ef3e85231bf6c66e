"""The loop core every trainer shares: output folder with the resolved config, resume
from the latest checkpoint that restores (a damaged one is skipped with a warning and
moved aside, see ``Checkpointer.restore_latest``), per-step metric logging, periodic
checkpoints, the non-finite guard, and SIGTERM / SIGINT handling (at once during
start-up; after checkpointing the current step once steps run).

A trainer reads like the algorithm::

    loop = TrainLoop(config, config.run, desc="grpo")
    state, start = loop.start(init_state)          # restores when run.resume is set
    for step in range(start, config.run.total_steps):
        state, metrics, finite = update(state, ...)   # jitted, uses apply_if_finite
        loop.end_step(step, state, metrics, finite=finite)
    return loop.finish(state, model=...)

The state is one pytree (params, optimizer state, RNG key data, KL controller, ...), so
a resumed run continues exactly: same parameters, optimizer moments, RNG stream and data
position as the uninterrupted run. Arrays are saved sharded (orbax) and restored into the
sharding of the initial state, so a run can resume on another mesh.

A run folder belongs to one run. Starting in a folder that holds another run's outputs
is an error unless ``run.resume=true`` (continue it: the saved config.yaml must match the
current config except ``RESUMABLE_FIELDS``) or ``run.overwrite=true`` (delete its run
outputs first — only what a run writes, see ``storage.RUN_OUTPUT_FILES``).

Multi-process runs (``jax.distributed``): every process runs the loop (the checkpoints go
through orbax's multi-host path, all processes taking part); only process 0 writes
config.yaml, metrics.jsonl, TensorBoard events and the HF export, clears the folder for
``run.overwrite``, and shows progress; the others wait for it at a barrier.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import yaml
from flax import nnx

from jaxrl_llm.train.checkpoint import Checkpointer, CheckpointMismatchError
from jaxrl_llm.train.config import config_to_dict, save_config
from jaxrl_llm.train.guard import NonFiniteGuard
from jaxrl_llm.train.metrics import MetricsLogger, read_metrics
from jaxrl_llm.train.storage import (
    check_clearable,
    check_free_space,
    checkpoint_steps,
    clear_run_outputs,
    describe_run_outputs,
    prepare_checkpoint_dir,
    prepare_output_dir,
    tree_nbytes,
)
from jaxrl_llm.train.validation import check_int_field

logger = logging.getLogger(__name__)

# Config fields that may differ between a run and its continuation (run.resume=true): they
# change how the run is started, watched or saved, or how the same computation is laid out,
# not what it computes. Any other difference from the saved config.yaml means another run
# and is an error. A name also covers its sub-fields ("mesh" covers "mesh.data").
RESUMABLE_FIELDS = (
    "run.resume",  # how this invocation starts ...
    "run.overwrite",  # ... not what the run computes
    "run.output_dir",  # the folder may have been moved or be spelled another way
    "run.total_steps",  # extend (or shorten) a run; a decaying LR schedule follows the new length
    "run.checkpoint_every",  # when checkpoints are written ...
    "run.keep_checkpoints",  # ... and how many are kept
    "run.progress",  # display only
    "run.tensorboard",  # logging only
    "run.max_consecutive_nonfinite",  # when to give up, not what an update does
    "run.export_hf",  # what is written at the end
    "save_hf",  # (reward model) what is written at the end
    "mesh",  # checkpoints restore into any mesh: the same math on another device layout
    "placement",  # where the sampler runs (colocated / disaggregated): the same samples at k=0
    "sampler_mesh",
    "reward_workers",  # threads scoring a batch: the same scores
    "microbatches",  # memory knob: the same update in smaller forward/backward passes
    "logprob_chunk_size",  # memory knob: the same log-probs in smaller chunks
    "eval_every",  # held-out evaluation: reported, never trained on
    "eval_batch_size",
)


class TrainingInterrupted(RuntimeError):
    """Raised after SIGTERM / SIGINT once the current step is checkpointed."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Run settings shared by every algorithm config (the ``run`` field).

    Attributes:
      output_dir: where config.yaml, metrics.jsonl, checkpoints/ and the export go.
      total_steps: number of optimizer iterations.
      seed: seeds parameter init, data order and sampling (an int >= 0).
      checkpoint_every: save every N steps (0: only at the end).
      keep_checkpoints: keep the last N checkpoints.
      resume: continue the run in output_dir from its latest checkpoint that restores
        (damaged newer ones are skipped, logged and moved aside); its saved
        config.yaml must match the current config except ``RESUMABLE_FIELDS`` (each other
        differing field is named in the error).
      overwrite: delete the run outputs already in output_dir (config.yaml, metrics,
        checkpoints/, export/, ...; never other files) and start afresh. Without resume or
        overwrite, an output_dir holding another run's outputs is an error.
      tensorboard: also write TensorBoard scalars.
      progress: show a progress bar.
      max_consecutive_nonfinite: stop with an error after this many skipped updates in a row.
      export_hf: at the end, write the trained model to output_dir/export as a Hugging Face
        checkpoint (safetensors + config.json + generation_config.json, plus the tokenizer
        files when the trainer passes its tokenizer) that transformers / vLLM load.
    """

    output_dir: str = "runs/run"
    total_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    progress: bool = True
    max_consecutive_nonfinite: int = 5
    export_hf: bool = True

    def __post_init__(self):
        check_int_field("total_steps", self.total_steps, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(
                f"run.seed must be an int >= 0 (it seeds parameter init, data order and "
                f"sampling), got {self.seed!r}"
            )
        check_int_field("checkpoint_every", self.checkpoint_every, 0)
        check_int_field("keep_checkpoints", self.keep_checkpoints, 1)
        check_int_field("max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1,
                  why="the run stops after this many skipped non-finite updates in a row")
        if self.resume and self.overwrite:
            raise ValueError(
                "run.resume=true and run.overwrite=true contradict each other: resume continues "
                f"the run in output_dir={self.output_dir!r}, overwrite deletes it. Set only one."
            )


@dataclasses.dataclass
class TrainResult:
    """What every ``train`` function returns.

    Attributes:
      model: the trained model (NNX module) or parameters.
      history: one metrics dict per step (including steps of an earlier, resumed run).
      output_dir: the run folder.
    """

    model: Any
    history: list[dict]
    output_dir: Path


class TrainLoop:
    """Bookkeeping around a trainer's step loop (see module docstring)."""

    def __init__(self, config: Any, run: RunConfig, desc: str = "train"):
        self.run = run
        self.is_writer = jax.process_index() == 0
        self.output_dir = Path(run.output_dir)
        self._stop_signal: int | None = None
        self._previous_handlers: dict = {}
        self._stepping = False  # True from the first end_step: signals then wait for the step
        # From here on SIGTERM / SIGINT end start-up (loading, restoring, compiling) at once
        # with TrainingInterrupted; once steps run, they finish the step and checkpoint.
        self._install_signal_handlers()
        try:
            self._setup(config, run, desc)
        except BaseException:
            self._restore_signal_handlers()
            raise

    def _setup(self, config: Any, run: RunConfig, desc: str) -> None:
        # Fail before any compute when the folder cannot be written (StorageError).
        self.output_dir = prepare_output_dir(run.output_dir)
        config_path = self.output_dir / "config.yaml"
        # Every process checks the folder before any process changes it (the barrier
        # below), so they all reach the same verdict.
        self._config_diffs: list[tuple[str, Any, Any]] = []
        if run.overwrite:
            check_clearable(self.output_dir)
        elif run.resume:
            self._config_diffs = self._check_resumable(config, config_path)
        else:
            found = describe_run_outputs(self.output_dir)
            if found:
                raise ValueError(
                    f"run.output_dir={str(self.output_dir)!r} already holds a run's outputs: "
                    f"{', '.join(found)}. A run folder belongs to one run: continue that run with "
                    "run.resume=true, replace it with run.overwrite=true (deletes those outputs), "
                    "or choose a new run.output_dir."
                )
        _sync_processes("jaxrl_llm.TrainLoop.checked")
        if self.is_writer:
            if run.overwrite:
                kept = clear_run_outputs(self.output_dir)
                if kept:
                    logger.info("run.overwrite: cleared %s; kept other files %s", self.output_dir, kept)
            save_config(config, config_path)
        _sync_processes("jaxrl_llm.TrainLoop.ready")
        # checkpoints/ may be a link to another disk: probe it too, before any compute.
        checkpoints_dir = prepare_checkpoint_dir(self.output_dir / "checkpoints")
        self.checkpointer = Checkpointer(checkpoints_dir, max_to_keep=run.keep_checkpoints)
        self.guard = NonFiniteGuard(run.max_consecutive_nonfinite)
        self.history: list[dict] = []
        self.meta: dict = {}
        self.skipped_checkpoints: list[tuple[int, str]] = []
        self._desc = desc
        self._logger: MetricsLogger | None = None

    def _check_resumable(self, config: Any, config_path: Path) -> list[tuple[str, Any, Any]]:
        """The config differences from the saved config.yaml (the run being resumed);
        raises ValueError naming every one outside ``RESUMABLE_FIELDS``."""
        if not config_path.is_file() or not config_path.read_text().strip():
            return []  # nothing saved yet: nothing to contradict
        try:
            saved = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{config_path} (the config of the run to resume) is not valid YAML: {err}") from err
        if not isinstance(saved, dict):  # a damaged file, not a wrong argument type
            raise ValueError(f"{config_path} (the config of the run to resume) is not a mapping")  # noqa: TRY004
        diffs = config_differences(saved, config)
        refused = [d for d in diffs if not is_resumable_field(d[0])]
        if refused:
            lines = "\n  ".join(f"{name}: saved {_show(old)}, now {_show(new)}" for name, old, new in refused)
            raise ValueError(
                f"run.resume=true, but the config differs from the one of the run in {self.output_dir} "
                f"({config_path.name}) in {len(refused)} field{'s' if len(refused) != 1 else ''}:\n  {lines}\n"
                "Resuming continues that run, so these must match (fields that may change on resume: "
                f"{', '.join(RESUMABLE_FIELDS)}). Restore them to resume, or start another run: a new "
                "run.output_dir, or run.overwrite=true (deletes the old run's outputs)."
            )
        return diffs

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def start(self, init_state: Any) -> tuple[Any, int]:
        """Returns (state, first step). Restores the latest checkpoint that restores when
        resuming (damaged newer ones are skipped, logged and moved aside, see
        ``Checkpointer.restore_latest``); otherwise starts fresh (an existing metrics.jsonl
        is replaced). Metric rows logged after the restored checkpoint are dropped."""
        try:
            return self._start(init_state)
        except BaseException:
            self._restore_signal_handlers()
            raise

    def _start(self, init_state: Any) -> tuple[Any, int]:
        state, start = init_state, 0
        nbytes = tree_nbytes(init_state)
        check_free_space(self.output_dir, nbytes)
        checkpoints_dir = self.checkpointer.directory
        if _device_of(checkpoints_dir) != _device_of(self.output_dir):  # checkpoints/ on another disk
            check_free_space(checkpoints_dir, nbytes, name="checkpoint folder")
        step = None
        if self.run.resume:
            try:
                restored, meta, step, self.skipped_checkpoints = self.checkpointer.restore_latest(init_state)
            except CheckpointMismatchError as err:
                raise CheckpointMismatchError(f"{err}{self._config_changes()}") from err
        if step is not None:
            state, self.meta, start = restored, meta, step
            self.guard.load_state_dict(self.meta.get("guard", {}))
            # Steps logged after the checkpoint are re-run: drop their lines.
            old = read_metrics(self.metrics_path, allow_partial_last_line=True) if self.metrics_path.exists() else []
            self.history = [row for row in old if _row_step(row, self.metrics_path) < start]
            if self.is_writer:
                self._rewrite_metrics(self.history)
        elif self.metrics_path.exists() and self.is_writer:
            self.metrics_path.unlink()
        self._logger = MetricsLogger(
            self.output_dir,
            total_steps=self.run.total_steps,
            initial_step=start,
            tensorboard=self.run.tensorboard,
            progress=self.run.progress,
            desc=self._desc,
            write=self.is_writer,
        )
        return state, start

    def _config_changes(self) -> str:
        """The config fields that differ from the run that wrote the checkpoints (only
        ``RESUMABLE_FIELDS`` can, see ``__init__``): context for a checkpoint mismatch."""
        if not self._config_diffs:
            return ""
        return "\nconfig fields changed since the checkpoint was written (saved -> now):\n  " + "\n  ".join(
            f"{name}: {_show(old)} -> {_show(new)}" for name, old, new in self._config_diffs
        )

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT (pre-emption, Ctrl-C).

        During start-up (until the first ``end_step``: loading, restoring, compiling) there
        is nothing new to save: the run stops at once with ``TrainingInterrupted``. Once
        steps run, the current step finishes, a checkpoint is written, then the run stops
        with ``TrainingInterrupted`` — no completed step is lost. A second signal while
        that stop is pending stops at once (the last complete checkpoint stays intact).
        """
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if not self._stepping:
                self._restore_signal_handlers()
                raise TrainingInterrupted(
                    f"stopped by signal {name} during start-up (loading, restoring or compiling), "
                    f"before the first step; nothing was lost: {self._resume_hint()}"
                )
            if self._stop_signal is not None:
                self._restore_signal_handlers()
                raise TrainingInterrupted(
                    f"stopped by a second signal {name} without finishing the step in progress; "
                    f"{self._resume_hint()}"
                )
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, on_signal)

    def _resume_hint(self) -> str:
        steps = checkpoint_steps(self.output_dir / "checkpoints")
        if steps:
            return f"the latest checkpoint is step {steps[-1]} in {self.output_dir / 'checkpoints'} (resume with run.resume=true)"
        return f"no checkpoint was written yet in {self.output_dir} (run again to start)"

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def _rewrite_metrics(self, rows: list[dict]) -> None:
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

    def end_step(self, step: int, state: Any, metrics: dict, finite: bool = True, meta: dict | None = None) -> dict:
        """Logs step ``step`` (0-based), updates the guard, checkpoints when due.

        The checkpoint saved after step s is labelled s + 1: the number of completed steps,
        which is where a resumed run starts.
        """
        assert self._logger is not None, "call start() first"
        self._stepping = True
        try:
            return self._end_step(step, state, metrics, finite, meta)
        except BaseException:
            self._restore_signal_handlers()
            raise

    def _end_step(self, step: int, state: Any, metrics: dict, finite: bool, meta: dict | None) -> dict:
        self.checkpointer.check_for_errors()  # a failed background save stops the run now
        self.guard.update(finite, step)
        row = self._logger.log(step, {**metrics, "skipped_updates": self.guard.total_skipped})
        self.history.append(row)
        if meta:
            self.meta.update(meta)
        done = step + 1
        every = self.run.checkpoint_every
        if self._stop_signal is not None and done < self.run.total_steps:
            self.save(done, state)
            self.checkpointer.close()
            self._logger.close()
            self._restore_signal_handlers()
            raise TrainingInterrupted(
                f"stopped by signal {signal.Signals(self._stop_signal).name} after step {step}; "
                f"checkpoint {done} written to {self.checkpointer.directory} (resume with run.resume=true)"
            )
        if every and done % every == 0 and done < self.run.total_steps:
            self.save(done, state)
        return row

    def save(self, completed_steps: int, state: Any) -> None:
        self.checkpointer.save(completed_steps, state, {**self.meta, "guard": self.guard.state_dict()})

    def finish(self, state: Any, model: Any = None, tokenizer: Any = None) -> TrainResult:
        """Final checkpoint, the HF export (``run.export_hf``, when ``model`` is a model),
        closes the logger, returns the TrainResult.

        Args:
          tokenizer: the run's tokenizer (HF or ``CharTokenizer``): written into the export
            with the weights (tokenizer files, chat template, generation_config.json ids),
            so ``from_pretrained(output_dir / "export")`` needs nothing else.
        """
        if self.run.total_steps not in self.checkpointer.all_steps():
            self.save(self.run.total_steps, state)
        self.checkpointer.close()
        self._restore_signal_handlers()
        if self.run.export_hf and isinstance(model, nnx.Module) and hasattr(model, "config"):
            from jaxrl_llm.models.hf_io import save_hf

            save_hf(model, self.output_dir / "export", tokenizer=tokenizer)
        if self._logger is not None:
            self._logger.close()
        return TrainResult(model=model if model is not None else state, history=self.history, output_dir=self.output_dir)


# ---------------------------------------------------------------------------- helpers

_MISSING = object()


def _sync_processes(name: str) -> None:
    """Barrier of all processes of a multi-process run (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _device_of(path: Path) -> int | None:
    """The file system (st_dev) holding ``path`` (following links), None if unknown."""
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def _row_step(row: dict, path: Path) -> int:
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{path}: the row {json.dumps(row)[:200]} has no integer 'step'; expected one row per step")  # noqa: TRY004
    return step


def _plain(value: Any) -> Any:
    """A config (or field value) as YAML would give it back (tuples → lists, ...)."""
    return yaml.safe_load(yaml.safe_dump(config_to_dict(value), sort_keys=False))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"run": {"seed": 0}} → {"run.seed": 0}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _field_default(config: Any, name: str) -> Any:
    """The default of the dotted field ``name`` of dataclass ``config`` (or _MISSING)."""
    value: Any = _MISSING
    cls = type(config)
    for part in name.split("."):
        if value is not _MISSING:
            if not dataclasses.is_dataclass(value) or not hasattr(value, part):
                return _MISSING
            value = getattr(value, part)
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return _MISSING
        field = fields[part]
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            return _MISSING
    return value


def is_resumable_field(name: str) -> bool:
    """Whether the dotted config field ``name`` may change on resume (``RESUMABLE_FIELDS``)."""
    return any(name == field or name.startswith(field + ".") for field in RESUMABLE_FIELDS)


def config_differences(saved: dict, config: Any) -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, current value) for every field of ``config`` that
    differs from the ``saved`` config.yaml mapping; a side missing a field shows it as
    absent. A field missing from ``saved`` that now has its default is no difference (a
    field added to the config class since the run was saved)."""
    old, new = _flatten(saved), _flatten(_plain(config))
    diffs = []
    for name in [*old, *(n for n in new if n not in old)]:
        a, b = old.get(name, _MISSING), new.get(name, _MISSING)
        if a is not _MISSING and b is not _MISSING and a == b:
            continue
        if a is _MISSING and b is not _MISSING:
            default = _field_default(config, name)
            if default is not _MISSING and _plain(default) == b:
                continue
        diffs.append((name, a, b))
    return diffs


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    return json.dumps(value, default=str)
