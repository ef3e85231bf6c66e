"""The loop core every trainer shares: output folder with the resolved config, resume
from the latest checkpoint, per-step metric logging, periodic checkpoints, and the
non-finite guard.

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

Multi-process runs (``jax.distributed``): every process runs the loop (the checkpoints go
through orbax's multi-host path, all processes taking part); only process 0 writes
config.yaml, metrics.jsonl, TensorBoard events and the HF export, and shows progress.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxrl_llm.train.checkpoint import Checkpointer, CheckpointMismatchError
from jaxrl_llm.train.config import save_config
from jaxrl_llm.train.guard import NonFiniteGuard
from jaxrl_llm.train.metrics import MetricsLogger, read_metrics
from jaxrl_llm.train.storage import check_free_space, prepare_output_dir, tree_nbytes


class TrainingInterrupted(RuntimeError):
    """Raised after SIGTERM / SIGINT once the current step is checkpointed."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Run settings shared by every algorithm config (the ``run`` field).

    Attributes:
      output_dir: where config.yaml, metrics.jsonl, checkpoints/ and the export go.
      total_steps: number of optimizer iterations.
      seed: seeds parameter init, data order and sampling.
      checkpoint_every: save every N steps (0: only at the end).
      keep_checkpoints: keep the last N checkpoints.
      resume: continue from the latest checkpoint in output_dir/checkpoints.
      tensorboard: also write TensorBoard scalars.
      progress: show a progress bar.
      max_consecutive_nonfinite: stop with an error after this many skipped updates in a row.
      export_hf: at the end, write the trained model to output_dir/export as a Hugging Face
        checkpoint (safetensors + config.json) that transformers / vLLM load.
    """

    output_dir: str = "runs/run"
    total_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True
    max_consecutive_nonfinite: int = 5
    export_hf: bool = True

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


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
        # Fail before any compute when the folder cannot be written (StorageError).
        self.output_dir = prepare_output_dir(run.output_dir)
        config_path = self.output_dir / "config.yaml"
        # Kept to explain a checkpoint that does not fit the new config (see start()).
        self._saved_config = config_path.read_text() if run.resume and config_path.exists() else None
        if self.is_writer:
            save_config(config, config_path)
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", max_to_keep=run.keep_checkpoints)
        self.guard = NonFiniteGuard(run.max_consecutive_nonfinite)
        self.history: list[dict] = []
        self.meta: dict = {}
        self._desc = desc
        self._logger: MetricsLogger | None = None
        self._stop_signal: int | None = None
        self._previous_handlers: dict = {}

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def start(self, init_state: Any) -> tuple[Any, int]:
        """Returns (state, first step). Restores the latest checkpoint when resuming;
        otherwise starts fresh (an existing metrics.jsonl is replaced)."""
        state, start = init_state, 0
        check_free_space(self.output_dir, tree_nbytes(init_state))
        latest = self.checkpointer.latest_step() if self.run.resume else None
        if latest is not None:
            try:
                state, self.meta = self.checkpointer.restore(init_state, latest)
            except CheckpointMismatchError as err:
                raise CheckpointMismatchError(f"{err}{self._config_changes()}") from err
            self.guard.load_state_dict(self.meta.get("guard", {}))
            start = latest
            # Steps logged after the checkpoint are re-run: drop their lines.
            old = read_metrics(self.metrics_path, allow_partial_last_line=True) if self.metrics_path.exists() else []
            self.history = [row for row in old if row["step"] < start]
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
        self._install_signal_handlers()
        return state, start

    def _config_changes(self) -> str:
        """The config.yaml lines that differ from the run that wrote the checkpoints."""
        if self._saved_config is None:
            return ""
        new = (self.output_dir / "config.yaml").read_text().splitlines()
        diff = difflib.unified_diff(self._saved_config.splitlines(), new, lineterm="", n=0)
        changed = [
            line
            for line in diff
            if line[:1] in "+-" and line[:3] not in ("+++", "---") and "resume:" not in line
        ]
        if not changed:
            return ""
        return "\nconfig.yaml changed since the checkpoint was written (- saved, + now):\n  " + "\n  ".join(changed[:20])

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT (pre-emption, Ctrl-C) finish the current step, write a
        checkpoint, then stop with ``TrainingInterrupted`` — no completed step is lost."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def request_stop(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, request_stop)

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

    def finish(self, state: Any, model: Any = None) -> TrainResult:
        """Final checkpoint, closes the logger, returns the TrainResult."""
        if self.run.total_steps not in self.checkpointer.all_steps():
            self.save(self.run.total_steps, state)
        self.checkpointer.close()
        self._restore_signal_handlers()
        if self.run.export_hf and isinstance(model, nnx.Module) and hasattr(model, "config"):
            from jaxrl_llm.models.hf_io import save_hf

            save_hf(model, self.output_dir / "export")
        if self._logger is not None:
            self._logger.close()
        return TrainResult(model=model if model is not None else state, history=self.history, output_dir=self.output_dir)
