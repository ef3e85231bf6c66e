"""Two JAX processes × 4 CPU devices run 3 GRPO steps from the command line and match one
process × 8 devices: the same metrics.jsonl (written by process 0 only) and the same
exported weights.

The two workers run ``python -m jaxrl_llm.cli grpo ...`` with
``JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>``, ``JAX_NUM_PROCESSES=2``, ``JAX_PROCESS_ID``
(read by ``parallel.init_distributed``, which the CLI calls first) and 4 simulated devices
each, into one shared run folder (as on a shared file system). The mesh 2×2×2 puts the
``data`` axis across the two processes, so sampling, log-probs and updates all cross the
process boundary. The reference is the same command in one process with 8 devices.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600

REWARD_FILE = '''
def even_length(prompts, completions, **columns):
    """1 for an even-length completion: varies within the groups of a random tiny model."""
    return [float(len(c) % 2 == 0) for c in completions]
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, port: int | None = None, process_id: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if port is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(process_id))
    return env


def _command(tmp: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "jaxrl_llm.cli", "grpo", "--preset", "dapo",
        "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(tmp / "data.jsonl"),
        "--reward", f"{tmp / 'reward.py'}:even_length",
        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
        f"run.output_dir={out}", "run.total_steps=3", "run.checkpoint_every=1", "run.progress=false",
        "optim.learning_rate=1e-2", "prompts_per_step=4", "group_size=4", "max_prompt_len=8",
        "max_new_tokens=6", "max_sampling_rounds=2",
    ]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no output>"


def _wait(procs: list[tuple[Path, subprocess.Popen]]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    for log, p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{log.name}: not finished in {TIMEOUT_S} s:\n{_tail(log)}")
        if p.returncode != 0:
            pytest.fail(f"{log.name}: exit code {p.returncode}:\n{_tail(log)}")


def _start(command: list[str], env: dict, log: Path) -> tuple[Path, subprocess.Popen]:
    with open(log, "w") as fo:
        return log, subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=fo, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders: (2 processes, 1 process, 2 processes resumed from their step-2 checkpoint)."""
    tmp = tmp_path_factory.mktemp("grpo_cli")
    (tmp / "reward.py").write_text(REWARD_FILE)
    with open(tmp / "data.jsonl", "w") as f:
        for record in make_arithmetic_dataset(32, 0, max_operand=9):
            f.write(json.dumps(record) + "\n")
    multi, single, resumed = tmp / "two_processes", tmp / "one_process", tmp / "two_processes_resumed"
    procs: list[tuple[Path, subprocess.Popen]] = []
    try:
        port = _free_port()
        procs = [_start(_command(tmp, multi), _env(4, port, i), tmp / f"p{i}.log") for i in range(2)]
        procs.append(_start(_command(tmp, single), _env(8), tmp / "single.log"))
        _wait(procs)
        # As if the two processes had been stopped after step 2: drop the last checkpoint,
        # resume both (orbax's multi-process restore, the prompt loader's position from meta).
        shutil.copytree(multi, resumed)
        shutil.rmtree(resumed / "checkpoints" / "3")
        port = _free_port()
        procs = [_start(_command(tmp, resumed) + ["run.resume=true"], _env(4, port, i), tmp / f"r{i}.log")
                 for i in range(2)]
        _wait(procs)
        return multi, single, resumed
    finally:
        for _, p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(single: Path, multi: Path) -> None:
    """The 2-process run equals the 1-process run: each step's metrics written once, equal
    (timings aside) to 2e-4, a learning signal present, and equal exported weights."""
    rows_multi, rows_single = _metrics(multi), _metrics(single)
    assert [r["step"] for r in rows_multi] == [0, 1, 2]  # process 0 wrote each step once
    assert [r["step"] for r in rows_single] == [0, 1, 2]
    assert any(r["reward_std"] > 0 for r in rows_single)  # there was a learning signal
    for a, b in zip(rows_single, rows_multi):
        for key, value in a.items():
            if key.startswith("time_") or key == "tokens_per_s" or not isinstance(value, (int, float)):
                continue
            np.testing.assert_allclose(b[key], value, rtol=2e-4, atol=2e-5, err_msg=f"{key} at step {a['step']}")
    w_multi, w_single = load_file(multi / "export" / "model.safetensors"), load_file(single / "export" / "model.safetensors")
    assert w_multi.keys() == w_single.keys()
    for key in w_single:
        np.testing.assert_allclose(w_multi[key], w_single[key], atol=3e-4, rtol=1e-4, err_msg=key)


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    multi, single, _ = runs
    assert_same_run(single, multi)
    # the checkpoints went through orbax's multi-process path into the one shared folder
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint(runs):
    """Both processes restore the sharded step-2 checkpoint and the loader position and re-run
    the last step: the same metrics and weights as the uninterrupted run."""
    multi, _, resumed = runs
    rows, rows_resumed = _metrics(multi), _metrics(resumed)
    assert [r["step"] for r in rows_resumed] == [0, 1, 2]
    # steps 0-1 are the checkpointed run's lines, kept as written; step 2 was run again
    assert rows_resumed[:2] == rows[:2]
    assert rows_resumed[2]["time_sampling"] != rows[2]["time_sampling"]
    for key, value in rows[-1].items():
        if key.startswith("time_") or key == "tokens_per_s" or not isinstance(value, (int, float)):
            continue
        np.testing.assert_allclose(rows_resumed[-1][key], value, rtol=2e-4, atol=2e-5, err_msg=key)
    w, w_resumed = load_file(multi / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    for key in w:
        np.testing.assert_allclose(w_resumed[key], w[key], atol=3e-4, rtol=1e-4, err_msg=key)
