"""Metric logging: JSONL always, TensorBoard when asked, and a progress bar that shows
the key numbers of the step."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxrl_llm.parallel.placement import host_array

logger = logging.getLogger(__name__)

# Shown in the progress bar when present, in this order.
PROGRESS_KEYS = ("loss", "reward_mean", "reward", "accuracy", "kept", "kl", "entropy", "tokens_per_s")
# Shown only when non-zero: a warning sign, not a routine figure.
PROGRESS_ALERT_KEYS = ("reward_unscored_frac",)


def to_python(metrics: dict[str, Any]) -> dict[str, Any]:
    """Array scalars → Python floats/ints so they serialise to JSON."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "shape") and getattr(value, "shape", None) == ():
            value = host_array(value).item()
        elif isinstance(value, (np.generic,)):
            value = value.item()
        out[key] = value
    return out


class MetricsLogger:
    """Appends one JSON line per step to ``output_dir/metrics.jsonl``."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int | None = None,
        initial_step: int = 0,
        tensorboard: bool = False,
        progress: bool = True,
        desc: str = "train",
        write: bool = True,
    ):
        """``write=False`` (processes other than 0 of a multi-process run): rows are
        returned but no file, TensorBoard event or progress bar is written."""
        self.output_dir = Path(output_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not write:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        self._bar = (
            tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
            if progress
            else None
        )

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **to_python(metrics)}
        if self._jsonl is None:
            return row
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            shown = {k: f"{row[k]:.4g}" for k in PROGRESS_KEYS if isinstance(row.get(k), (int, float))}
            shown.update({k.removeprefix("reward_"): f"{row[k]:.2g}" for k in PROGRESS_ALERT_KEYS
                          if isinstance(row.get(k), (int, float)) and row[k]})
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        return row

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def read_metrics(path: str | os.PathLike, *, allow_partial_last_line: bool = False) -> list[dict]:
    """Reads a metrics.jsonl file back (one dict per step).

    Args:
      allow_partial_last_line: drop a last line that does not parse (a process killed
        while writing it, or the NUL bytes some file systems leave after a crash) instead
        of raising; used when resuming.

    Raises:
      ValueError: a line that is not a JSON object (or not UTF-8), naming the file and the
        line number; with ``allow_partial_last_line`` only for lines before the last.
    """
    lines = Path(path).read_bytes().split(b"\n")
    while lines and not lines[-1].strip(b" \t\r\x00"):
        lines.pop()  # the newline after the last row, or a NUL-filled tail
    rows = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, expected an object like {{\"step\": 0, ...}}")  # noqa: TRY004 - caught below
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if allow_partial_last_line and number == len(lines):
                logger.warning("%s: dropped a half-written last line (%d bytes): %s", path, len(raw), err)
                break
            hint = (
                " Only a half-written last line (a kill mid-write) is repaired on resume; fix or "
                "delete this line." if allow_partial_last_line else ""
            )
            raise ValueError(f"{path}, line {number}: not a JSON object ({err}).{hint}") from err
        rows.append(row)
    return rows
