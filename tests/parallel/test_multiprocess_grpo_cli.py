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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(run folder of the 2-process run, run folder of the 1-process run)."""
    tmp = tmp_path_factory.mktemp("grpo_cli")
    (tmp / "reward.py").write_text(REWARD_FILE)
    with open(tmp / "data.jsonl", "w") as f:
        for record in make_arithmetic_dataset(32, 0, max_operand=9):
            f.write(json.dumps(record) + "\n")
    port = _free_port()
    multi, single = tmp / "two_processes", tmp / "one_process"
    procs, logs = [], []
    try:
        for i in range(2):
            log = tmp / f"p{i}.log"
            logs.append(log)
            with open(log, "w") as fo:
                procs.append(subprocess.Popen(_command(tmp, multi), cwd=REPO_ROOT, env=_env(4, port, i),
                                              stdout=fo, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        with open(tmp / "single.log", "w") as fo:
            procs.append(subprocess.Popen(_command(tmp, single), cwd=REPO_ROOT, env=_env(8),
                                          stdout=fo, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        logs.append(tmp / "single.log")
        deadline = time.monotonic() + TIMEOUT_S
        for log, p in zip(logs, procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{log.name}: not finished in {TIMEOUT_S} s:\n{_tail(log)}")
            if p.returncode != 0:
                pytest.fail(f"{log.name}: exit code {p.returncode}:\n{_tail(log)}")
        return multi, single
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    multi, single = runs
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
    # the checkpoints went through orbax's multi-process path into the one shared folder
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
