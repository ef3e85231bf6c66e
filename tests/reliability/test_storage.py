"""Storage faults: an unwritable or full output directory fails at start (before any
compute); a disk that fills up during a checkpoint write leaves the previous checkpoint
loadable; a checkpoint whose config does not match the weights is named at resume."""

import dataclasses
import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxrl_llm.models.config import ModelConfig, tiny_config
from jaxrl_llm.models.transformer import CausalLM
from jaxrl_llm.train import storage
from jaxrl_llm.train.checkpoint import Checkpointer, CheckpointMismatchError
from jaxrl_llm.train.loop import RunConfig, TrainLoop
from jaxrl_llm.train.storage import (
    StorageError,
    check_free_space,
    prepare_output_dir,
    tree_nbytes,
)


@dataclasses.dataclass(frozen=True)
class ModelRunConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=tiny_config)


def _run(out, **run_kw) -> RunConfig:
    return RunConfig(output_dir=str(out), total_steps=2, progress=False, export_hf=False, **run_kw)


def _model_state(config: ModelConfig) -> dict:
    model = CausalLM(config, rngs=nnx.Rngs(0))
    return {"params": nnx.state(model, nnx.Param), "step": jnp.zeros((), jnp.int32)}


def _toy_state(width: int = 4) -> dict:
    return {"params": {"w": jnp.arange(float(width))}, "rng": jax.random.key_data(jax.random.PRNGKey(0))}


# ---------------------------------------------------------------- unwritable / full at start


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def test_output_dir_under_a_file_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=r"run.output_dir=.*a_file/run' cannot be created"):
        TrainLoop(ModelRunConfig(), _run(blocker / "run"))


def test_read_only_output_dir_fails_at_construction(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if _is_root():
        # chmod does not stop root: make the probe write fail the way a read-only mount does.
        real_open = open

        def read_only_open(path, mode="r", *args, **kwargs):
            if ".write_probe_" in str(path) and "w" in mode:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", read_only_open)
    else:
        out.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=r"run.output_dir=.*ro' is not writable: (Read-only file system|Permission denied)"):
            prepare_output_dir(out)
        monkeypatch.undo()
        assert not list(out.iterdir())  # no probe left behind
    finally:
        out.chmod(0o700)


def test_disk_too_full_for_a_checkpoint_fails_before_the_first_step(tmp_path, monkeypatch):
    state = _toy_state(1000)
    loop = TrainLoop(ModelRunConfig(), _run(tmp_path))
    usage = storage.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: usage._replace(free=100))
    with pytest.raises(StorageError, match=r"has 100.0 B free but a checkpoint needs about 7.8 KiB \(2 x the 3.9 KiB training state\)"):
        loop.start(state)


def test_tree_nbytes_and_free_space_ok(tmp_path):
    assert tree_nbytes({"a": np.zeros((3, 4), np.float32), "b": jax.ShapeDtypeStruct((2,), jnp.bfloat16), "c": "x"}) == 52
    check_free_space(tmp_path, 1024)  # a real disk has a KiB free


# ---------------------------------------------------------------- disk full during a checkpoint write


def test_disk_full_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    ckpt.save(1, _toy_state(), {"data_position": 1})
    ckpt.wait()

    def disk_full(self, x, directory):  # the JSON side-car is written after the arrays
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    new_state = jax.tree.map(lambda x: x + 1, _toy_state())
    with pytest.raises(StorageError, match=r"checkpoint.*No space left on device; the last complete checkpoint, step 1, is intact"):
        ckpt.save(2, new_state, {"data_position": 2})
        ckpt.wait()
    monkeypatch.undo()
    # A fresh process (new Checkpointer) resumes from step 1, never from the partial step 2.
    reader = Checkpointer(tmp_path)
    assert reader.latest_step() == 1
    restored, meta = reader.restore(_toy_state())
    np.testing.assert_array_equal(restored["params"]["w"], _toy_state()["params"]["w"])
    assert meta == {"data_position": 1}
    reader.close()


# ---------------------------------------------------------------- checkpoint / config mismatch


def test_resume_with_another_hidden_size_names_the_field_then_checkpoint_and_leaf(tmp_path):
    small = ModelRunConfig(run=_run(tmp_path), model=tiny_config(hidden_size=32, head_dim=8))
    loop = TrainLoop(small, small.run)
    state, _ = loop.start(_model_state(small.model))
    loop.finish(state)

    big = ModelRunConfig(run=_run(tmp_path, resume=True), model=tiny_config(hidden_size=64, head_dim=8))
    # the saved config.yaml says another model: refused before anything is restored
    with pytest.raises(ValueError, match=r"in 1 field:\n  model.hidden_size: saved 32, now 64\n"):
        TrainLoop(big, big.run)
    # a state that does not fit the checkpoint names the checkpoint and the leaf
    loop = TrainLoop(dataclasses.replace(small, run=big.run), big.run)
    with pytest.raises(CheckpointMismatchError) as info:
        loop.start(_model_state(big.model))
    message = str(info.value)
    assert f"checkpoint {tmp_path / 'checkpoints' / '2'} does not match" in message
    assert "params.model.embed.value: checkpoint has shape (259, 32), the current config expects (259, 64)" in message


def test_restore_into_another_tree_names_missing_and_extra_leaves(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(3, {"params": {"w": jnp.zeros(4)}})
    with pytest.raises(CheckpointMismatchError, match=r"params.v: expected \(4,\), not in the checkpoint"):
        ckpt.restore({"params": {"v": jnp.zeros(4)}})
    with pytest.raises(CheckpointMismatchError, match=r"params.w: in the checkpoint \(4,\), not expected"):
        ckpt.restore({"params": {"v": jnp.zeros(4)}})
    ckpt.close()
