"""One of two JAX processes (4 CPU devices each) sharing a checkpoint folder: saves an
8-way sharded state at steps 1 and 2, process 0 damages step 2, then both resume with
``Checkpointer.restore_latest`` and print what they restored as one JSON line.

Usage: python damaged_checkpoint_worker.py DIR DAMAGE (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES=2, JAX_PROCESS_ID in the environment).
"""

from __future__ import annotations

import glob
import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrl_llm.parallel import init_distributed
from jaxrl_llm.train.checkpoint import Checkpointer


def _values(step: int) -> np.ndarray:
    return np.random.default_rng(step).normal(size=(512, 64)).astype(np.float32)


def _state(step: int, sharding) -> dict:
    host = _values(step)
    return {"w": jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]),
            "step": np.asarray(step, np.int32)}


def _damage(step_dir: str, kind: str) -> None:
    """Damages the data file one process wrote (``state/ocdbt.process_<i>/d/``; each
    process reads back the shards it wrote, so damage to process 1's file fails only
    process 1's reads). The array is large enough for OCDBT to keep it out of its
    CRC-checked b-tree nodes, as model weights are."""
    owner = 1 if kind == "truncated-array-file" else 0
    path = max(glob.glob(f"{step_dir}/state/ocdbt.process_{owner}/d/*"), key=os.path.getsize)
    if kind == "truncated-array-file":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # bytes changed in place, size kept: only the checksums can tell
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            old = f.read(16)
            f.seek(-len(old), os.SEEK_CUR)
            f.write(bytes(b ^ 0x5A for b in old))


def main(directory: str, kind: str) -> None:
    init_distributed()
    assert jax.process_count() == 2 and jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    ckpt = Checkpointer(directory, max_to_keep=5)
    for step in (1, 2):
        ckpt.save(step, _state(step, sharding), {"position": step})
    ckpt.close()
    multihost_utils.sync_global_devices("saved")
    if jax.process_index() == 0:
        _damage(os.path.join(directory, "2"), kind)
    multihost_utils.sync_global_devices("damaged")

    ckpt = Checkpointer(directory)
    state, meta, step, damaged = ckpt.restore_latest(_state(0, sharding))
    ckpt.close()
    local_equal = all(np.array_equal(np.asarray(s.data), _values(1)[s.index]) for s in state["w"].addressable_shards)
    print(json.dumps({"process": jax.process_index(), "step": step, "meta": meta, "damaged": damaged,
                      "restored_equals_step_1": local_equal, "shards": len(state["w"].addressable_shards)}),
          flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
