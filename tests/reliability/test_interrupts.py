"""Fault injection by subprocess + signal: SIGTERM / SIGINT checkpoint and stop; SIGKILL at
random moments (including mid-checkpoint) never loses a completed step, and the resumed
metrics equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_llm.train.metrics import read_metrics

WORKER = Path(__file__).with_name("toy_worker.py")
STEPS = 12


def _start(out: Path, resume: bool, delay: float) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(out), str(STEPS), "1" if resume else "0", str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while _logged_steps(out) < n:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("worker too slow")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = _start(out, resume=False, delay=0.0)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_then_stop(tmp_path, uninterrupted, sig):
    proc = _start(tmp_path, resume=False, delay=0.3)
    _wait_for_steps(proc, tmp_path, 3)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert code != 0 and "TrainingInterrupted" in stderr and "resume with run.resume=true" in stderr
    done = _logged_steps(tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == done  # the step in progress finished and was checkpointed
    proc = _start(tmp_path, resume=True, delay=0.0)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert read_metrics(tmp_path / "metrics.jsonl") == uninterrupted


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path, uninterrupted):
    rng = np.random.default_rng(0)
    kills, resume = 0, False
    while True:
        proc = _start(tmp_path, resume=resume, delay=0.05)
        if kills < 4:
            before = _logged_steps(tmp_path)
            _wait_for_steps(proc, tmp_path, min(before + 1, STEPS))
            time.sleep(float(rng.uniform(0.0, 0.2)))  # lands mid-step or mid-checkpoint-write
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait(timeout=60)
            resume = True
            continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
        break
    assert kills == 4
    assert read_metrics(tmp_path / "metrics.jsonl") == uninterrupted
