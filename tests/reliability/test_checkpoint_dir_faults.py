"""The checkpoint folder fails: checked before any compute like the run folder (it may be
a link to another disk), and a folder that becomes unwritable mid-run stops the run with
``StorageError`` at once — orbax's background save threads are abandoned instead of
keeping the process alive for their 300 s timeout."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxrl_llm.train import loop as loop_module
from jaxrl_llm.train import storage
from jaxrl_llm.train.checkpoint import Checkpointer
from jaxrl_llm.train.loop import RunConfig, TrainLoop
from jaxrl_llm.train.storage import StorageError

REPO = Path(__file__).resolve().parents[2]
WORKER_CODE = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from jaxrl_llm.train.loop import RunConfig
from tests.train.test_loop_core import ToyConfig, toy_train
run = RunConfig(output_dir=sys.argv[1], total_steps=60, checkpoint_every=5, progress=False, export_hf=False)
toy_train(ToyConfig(run=run), step_delay=0.2)
"""


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def _run(out, **kw) -> RunConfig:
    return RunConfig(output_dir=str(out), total_steps=2, progress=False, export_hf=False, **kw)


def _state():
    return {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 32)), "step": jnp.zeros((), jnp.int32)}


def _orbax_save_threads() -> list[threading.Thread]:
    from orbax.checkpoint._src.futures import future

    return [t for t in threading.enumerate() if isinstance(t, future._SignalingThread) and t.is_alive()]


def _break_folder(path: Path) -> None:
    """The checkpoint folder stops being one (works as root, where chmod does not bind)."""
    os.rename(path, str(path) + ".gone")
    path.write_text("no longer a folder")


# ------------------------------------------------------------------ pre-flight


def test_checkpoint_link_to_an_unusable_place_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(blocker / "ckpts")  # checkpoints/ on "another disk"
    with pytest.raises(StorageError, match=r"checkpoint folder '.*checkpoints' cannot be created: Not a directory"):
        TrainLoop(Config(), _run(out, resume=True))


def test_read_only_checkpoint_folder_fails_at_construction(tmp_path, monkeypatch):
    real_open = open

    def read_only_checkpoints(path, mode="r", *args, **kwargs):
        if ".write_probe_" in str(path) and "/checkpoints/" in str(path) and "w" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_checkpoints)
    with pytest.raises(StorageError, match=r"checkpoint folder='.*checkpoints' is not writable: Read-only file system"):
        TrainLoop(Config(), _run(tmp_path / "run"))
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]  # no probe left behind


def test_full_checkpoint_disk_fails_before_the_first_step(tmp_path, monkeypatch):
    loop = TrainLoop(Config(), _run(tmp_path / "run"))
    checkpoints = loop.checkpointer.directory
    real_usage = storage.shutil.disk_usage
    monkeypatch.setattr(loop_module, "_device_of", lambda path: hash(str(path)))  # two disks
    monkeypatch.setattr(storage.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=100) if str(p) == str(checkpoints) else real_usage(p))
    with pytest.raises(StorageError, match=r"checkpoint folder='.*checkpoints' has 100.0 B free but a checkpoint needs"):
        loop.start(_state())


# ------------------------------------------------------------------ mid-run


def test_failed_async_save_abandons_orbax_threads(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, _state())
    ckpt.wait()
    _break_folder(tmp_path / "checkpoints")
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"checkpoints failed: Not a directory"):
        ckpt.save(2, _state())  # asynchronous: the failure shows at the next save or wait
        ckpt.wait()
    deadline = time.monotonic() + 15
    while _orbax_save_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _orbax_save_threads(), "orbax threads of the failed save still wait"
    assert time.monotonic() - start < 20  # orbax alone waits 300 s
    ckpt.close()  # a no-op after the failure, not a second error


@pytest.mark.slow
def test_run_whose_checkpoint_folder_becomes_unwritable_exits_at_once(tmp_path):
    """A real training process: its checkpoint folder stops being writable after 3 steps;
    it must stop with StorageError and exit, not linger on background threads."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # checkpoints every 5 steps: the folder breaks with no save in flight, so the next save
    # fails creating its step folder — the case where orbax's threads wait 300 s
    proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "worker too slow"
        time.sleep(0.05)
    _break_folder(tmp_path / "checkpoints")
    broken = time.time()
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run kept going (or lingered) more than 90 s after its checkpoint folder broke")
    stderr = proc.stderr.read()
    assert code != 0 and "StorageError" in stderr and "checkpoints failed: Not a directory" in stderr
    assert time.time() - broken < 60, f"exited {time.time() - broken:.0f} s after the folder broke"
