"""Soft overlong punishment keeps responses out of the penalty buffer and away from the cap."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_overlong_penalty_quick(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "overlong_penalty.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=600)
    out = tmp_path / "overlong_penalty"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "overlong_penalty.png").stat().st_size > 10_000
    plain = summary["arms"]["no length penalty"]
    soft = summary["arms"][f"soft overlong punishment (buffer {summary['buffer']})"]
    # with the penalty: no held-out response cut at max_new_tokens, fewer in the buffer, shorter on average
    assert soft["held_out_truncated"] == 0.0
    assert soft["held_out_in_buffer_or_cut"] <= plain["held_out_in_buffer_or_cut"]
    assert soft["held_out_length"] < plain["held_out_length"] - 0.1
