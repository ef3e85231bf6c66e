"""SIGTERM / SIGINT during start-up (folder checks, restoring, compiling: before the first
step) stop the run at once with ``TrainingInterrupted`` — one line from the CLI, not a
traceback from inside jax. Once steps run, the step finishes and is checkpointed first; a
second signal does not wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxrl_llm.train.loop import RunConfig, TrainingInterrupted, TrainLoop
from jaxrl_llm.train.storage import checkpoint_steps
from tests.train.test_loop_core import ToyConfig


def _config(out, **run) -> ToyConfig:
    run = {"total_steps": 5, "progress": False, "export_hf": False, **run}
    return ToyConfig(run=RunConfig(output_dir=str(out), **run))


def _signal_self(sig: int, loop: TrainLoop) -> None:
    """Sends ``sig`` to this process once the loop's handler is in place (never the
    default action, which would end the test process), then gives it time to act."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers live in the main thread")
    handler = signal.getsignal(sig)
    assert callable(handler) and getattr(handler, "__qualname__", "").startswith("TrainLoop."), handler
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the handler raises here, at the next bytecode
    pytest.fail("the signal did not interrupt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_before_the_first_step_stops_at_once(tmp_path, sig):
    previous = signal.getsignal(sig)
    loop = TrainLoop(_config(tmp_path), _config(tmp_path).run)
    loop.start({"w": jnp.zeros(3)})  # what follows is the first step's compile
    with pytest.raises(TrainingInterrupted, match=rf"stopped by signal {sig.name} during start-up .*before the first "
                                                  r"step; nothing was lost: no checkpoint was written yet"):
        _signal_self(sig, loop)
    assert signal.getsignal(sig) is previous  # handlers given back
    assert checkpoint_steps(tmp_path / "checkpoints") == []


def test_signal_while_constructing_or_restoring_names_the_checkpoint(tmp_path):
    from tests.train.test_loop_core import toy_train

    toy_train(_config(tmp_path, checkpoint_every=2))
    config = _config(tmp_path, resume=True, total_steps=8)
    loop = TrainLoop(config, config.run)  # handlers are in place from here on
    with pytest.raises(TrainingInterrupted, match=r"during start-up.*the latest checkpoint is step 5 .*run.resume=true"):
        _signal_self(signal.SIGTERM, loop)


def test_after_the_first_step_the_step_finishes_and_a_second_signal_does_not_wait(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    config = _config(tmp_path, total_steps=10)
    loop = TrainLoop(config, config.run)
    state, _ = loop.start({"w": jnp.zeros(3)})
    loop.end_step(0, state, {"loss": 1.0})
    os.kill(os.getpid(), signal.SIGTERM)  # deferred: the step in progress finishes
    time.sleep(0.2)
    with pytest.raises(TrainingInterrupted, match=r"stopped by a second signal SIGINT without finishing the step"):
        _signal_self(signal.SIGINT, loop)
    assert signal.getsignal(signal.SIGINT) is previous


# ------------------------------------------------------------------ a real CLI process


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signalled_while_compiling_prints_one_line(tmp_path, sig):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxrl_llm.cli", "sft", "--policy", "tiny:llama", "--tokenizer", "char",
         "--data", str(data), f"run.output_dir={out}", "run.total_steps=50", "run.progress=false",
         "run.export_hf=false", "batch_size=4", "max_len=16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    deadline = time.time() + 240
    while not (out / "config.yaml").exists():  # written by TrainLoop, after its handlers
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "CLI too slow to start"
        time.sleep(0.01)
    proc.send_signal(sig)
    sent = time.time()
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert time.time() - sent < 30
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"jaxrl-llm sft: error: stopped by signal {sig.name} during start-up" in stderr, stderr[-2000:]
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
