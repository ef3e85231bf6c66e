"""Two real JAX processes on loopback (2 CPU devices each) run the same sharded train step
as one process on 4 devices.

The test starts ``tests/parallel/multiprocess_worker.py`` twice with
``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES=2``,
``JAX_PROCESS_ID=0/1`` (read by ``parallel.init_distributed``) and
``--xla_force_host_platform_device_count=2``; cross-process collectives on CPU go through
gloo (JAX's default ``jax_cpu_collectives_implementation``). Each process builds the toy
model with ``create_sharded`` on a ``(data=1, fsdp=2, tensor=2)`` mesh over the 4 global
devices — so FSDP (parameter all-gathers, gradient reduce-scatters and the batch split)
crosses the process boundary, tensor parallelism stays inside a process —, places only its
8 rows of the 16-row batch with ``shard_batch`` and runs one ``make_train_step`` update
with 2 micro-batches, then a second update fed its local rows directly. Losses, grad norms,
token count and per-parameter checksums must agree between the two processes and with the
same two steps run here on 4 of the 8 simulated devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_llm.parallel import make_mesh

from .multiprocess_worker import run_step

REPO_ROOT = Path(__file__).resolve().parents[2]
MESH = (1, 2, 2)
TIMEOUT_S = 300  # whole run; ~15 s per process on an idle 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(port: int, process_id: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_", "SLURM_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(process_id),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no output>"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(outputs of the 2 worker processes, reference result of this process on 4 devices)."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    procs, files = [], []
    try:
        for i in range(2):
            out, err = tmp / f"p{i}.out", tmp / f"p{i}.err"
            files.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.parallel.multiprocess_worker",
                         ",".join(map(str, MESH))],
                        cwd=REPO_ROOT,
                        env=_worker_env(port, i),
                        stdout=fo,
                        stderr=fe,
                        stdin=subprocess.DEVNULL,
                    )
                )
        # the single-process reference runs here while the workers start up
        reference = run_step(make_mesh(*MESH, devices=jax.devices()[:4]))
        deadline = time.monotonic() + TIMEOUT_S
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {i} did not finish in {TIMEOUT_S} s; stderr:\n{_tail(files[i][1])}")
        for i, p in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"worker {i} exited with {p.returncode}; stderr:\n{_tail(files[i][1])}")
        outputs = []
        for out, _ in files:
            lines = out.read_text().splitlines()
            tagged = lambda tag: [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith(tag + " ")]
            outputs.append({"allgather": tagged("ALLGATHER"), "results": tagged("RESULT")})
        return outputs, reference
    finally:
        for p in procs:  # never leave a process behind (also on failure / timeout)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _numbers(result: dict) -> dict[str, float]:
    flat = {k: result[k] for k in ("loss", "grad_norm", "num_tokens", "loss_2", "grad_norm_2")}
    for group in ("param_sum", "param_sq_sum"):
        flat.update({f"{group}{k}": v for k, v in result[group].items()})
    return flat


def test_two_processes_see_four_devices_and_allgather(runs):
    outputs, _ = runs
    for i, out in enumerate(outputs):
        assert out["allgather"] == [[0, 1]], out
        (result,) = out["results"]
        assert result["process_index"] == i and result["process_count"] == 2
        assert result["mesh"] == dict(zip(("data", "fsdp", "tensor"), MESH))
        assert result["step"] == 2


def test_two_process_step_matches_single_process(runs):
    outputs, reference = runs
    assert reference["process_count"] == 1
    ref = _numbers(reference)
    assert ref["num_tokens"] > 0 and ref["grad_norm"] > 0.1
    assert ref["loss_2"] < ref["loss"]  # the first update did something
    per_process = [_numbers(out["results"][0]) for out in outputs]
    assert per_process[0].keys() == ref.keys()
    for numbers in per_process:
        got = np.array([numbers[k] for k in ref])
        want = np.array([ref[k] for k in ref])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # both processes read the same replicated values
    np.testing.assert_allclose(
        [per_process[0][k] for k in ref], [per_process[1][k] for k in ref], rtol=1e-6, atol=1e-6
    )
