"""benchmarks/report.py: latest row per configuration, quick rows dropped, README block replaced."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import report  # noqa: E402


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_latest_row_per_configuration_and_device(tmp_path):
    base = {"B": 256, "T": 128, "device": "cpu", "time": "2026-11-01T00:00:00"}
    write_rows(tmp_path / "gae.jsonl", [
        {**base, "scan_ms": 1.0, "assoc_ms": 3.0},
        {**base, "scan_ms": 2.0, "assoc_ms": 5.0, "time": "2026-11-02T00:00:00"},  # newer: wins
        {**base, "scan_ms": 9.0, "quick": True},  # quick: dropped
        {**base, "device": "NVIDIA H100", "scan_ms": 7.5, "assoc_ms": 0.25},  # other device: own row
    ])
    rows = report.latest_rows(report.load_rows(tmp_path / "gae.jsonl"), ("B", "T"))
    assert [(r["device"], r["scan_ms"]) for r in rows] == [("NVIDIA H100", 7.5), ("cpu", 2.0)]
    block = report.render(tmp_path)
    assert "| 2026-11-02 | cpu | 256 | 128 | 2 | 5 |" in block
    assert "| NVIDIA H100 | 256 | 128 | 7.5 | 0.25 |" in block
    assert "9" not in block.split("**gae**")[1].split("cpu")[1]  # the quick row is not shown
    assert "**rollout**" not in block  # no file, no table
    with_quick = report.latest_rows(report.load_rows(tmp_path / "gae.jsonl"), ("B", "T"), include_quick=True)
    assert sorted(r["scan_ms"] for r in with_quick) == [7.5, 9.0]


def test_replace_block_keeps_the_rest_and_needs_markers():
    text = f"intro\n{report.BEGIN}\nold table\n{report.END}\noutro\n"
    assert report.replace_block(text, "new") == f"intro\n{report.BEGIN}\nnew\n{report.END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        report.replace_block("no markers here", "new")


def test_readme_block_is_up_to_date():
    """The committed README block equals what the committed results render to."""
    readme = (report.HERE / "README.md").read_text()
    assert report.replace_block(readme, report.render()) == readme
