"""Disaggregated GRPO across two JAX processes × 4 CPU devices, from the command line:
each process gives the sampler 2 of its devices and the trainer 2, the weights cross from
the trainer's device set to the sampler's every step (JAX reshards between equal device
sets only, so ``RolePlacements.to_sampler`` gathers on the trainer's mesh and copies the
local slices), and the run matches the same command in one process × 8 devices.
Asynchronous sampling with several processes is refused at start, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from tests.parallel.test_multiprocess_grpo_cli import (
    REWARD_FILE,
    _env,
    _free_port,
    _start,
    _tail,
    _wait,
    assert_same_run,
)


def _command(tmp: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jaxrl_llm.cli", "grpo",
        "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(tmp / "data.jsonl"),
        "--reward", f"{tmp / 'reward.py'}:even_length",
        "placement=disaggregated", "sampler_mesh.num_devices=4", "mesh.data=2", "mesh.fsdp=2",
        f"run.output_dir={out}", "run.total_steps=3", "run.progress=false", "optim.learning_rate=1e-2",
        "prompts_per_step=4", "group_size=4", "max_prompt_len=8", "max_new_tokens=6", "kl_coef=0.0",
        "tis_cap=2.0", *extra,
    ]


@pytest.mark.slow
def test_two_processes_disaggregated_match_one_process(tmp_path):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    with open(tmp_path / "data.jsonl", "w") as f:
        for record in make_arithmetic_dataset(32, 0, max_operand=9):
            f.write(json.dumps(record) + "\n")
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    port = _free_port()
    procs = [_start(_command(tmp_path, multi), _env(4, port, i), tmp_path / f"p{i}.log") for i in range(2)]
    procs.append(_start(_command(tmp_path, single), _env(8), tmp_path / "single.log"))
    try:
        _wait(procs)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert_same_run(single, multi)

    # max_staleness > 0: refused on every process before any sampling, naming the field
    port = _free_port()
    procs = [_start(_command(tmp_path, tmp_path / "async", "max_staleness=1"), _env(4, port, i),
                    tmp_path / f"a{i}.log") for i in range(2)]
    for log, p in procs:
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"{log.name}: the refused run did not stop:\n{_tail(log)}")
        assert p.returncode != 0
        assert "max_staleness=1: asynchronous sampling runs in one process only" in log.read_text(), _tail(log)
