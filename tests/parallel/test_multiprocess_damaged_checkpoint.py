"""Two JAX processes resume from a shared checkpoint folder whose latest checkpoint is
damaged: both fall back to the same previous checkpoint (they agree, even where only one
process's reads fail), the damaged one is moved aside once, and the restored shards equal
the ones saved. Worker: ``damaged_checkpoint_worker.py``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.parallel.test_multiprocess_grpo_cli import _env, _free_port, _start, _wait

WORKER = Path(__file__).with_name("damaged_checkpoint_worker.py")

REASONS = {
    # half of process 1's data file gone: only process 1's reads fail, process 0 is told
    "truncated-array-file": r"an array file is truncated",
    # bytes changed in place: every read succeeds, the checksums (global sums) disagree
    "bytes-overwritten-in-array-file": r"the arrays read back differ from the ones saved \(checksum mismatch in \['w'\]\)",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(REASONS))
def test_both_processes_fall_back_to_the_same_checkpoint(tmp_path, kind):
    port = _free_port()
    procs = [_start([sys.executable, str(WORKER), str(tmp_path / "checkpoints"), kind], _env(4, port, i),
                    tmp_path / f"p{i}.log") for i in range(2)]
    _wait(procs)
    results = []
    for log, _ in procs:
        lines = [line for line in log.read_text().splitlines() if line.startswith('{"process"')]
        assert len(lines) == 1, log.read_text()[-3000:]
        results.append(json.loads(lines[0]))
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["step"] == 1 and r["meta"] == {"position": 1}, r
        assert r["restored_equals_step_1"] and r["shards"] == 4, r
        ((bad, why),) = r["damaged"]
        assert bad == 2 and (re.search(REASONS[kind], why) or why.startswith("damaged on another process")), why
    assert any(re.search(REASONS[kind], r["damaged"][0][1]) for r in results)
    moved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("2.damaged-")]
    assert len(moved) == 1, moved  # moved aside once, by one process, and kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
