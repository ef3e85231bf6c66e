"""Shared plumbing for experiment scripts: output folder, JSONL metrics, summary, plot."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def experiment_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (< 1 minute)")
    parser.add_argument("--out", default="results", help="root folder for results/<name>/")
    parser.add_argument("--seed", type=int, default=0)
    return parser


class ExperimentWriter:
    """Writes results/<name>/metrics.jsonl, summary.json and plots."""

    def __init__(self, root: str, name: str):
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.dir / "metrics.jsonl", "w")

    def log(self, **row) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def summary(self, summary: dict) -> Path:
        self._metrics.close()
        path = self.dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
        return path

    def plot_path(self, filename: str = "plot.png") -> Path:
        return self.dir / filename
