"""One process of the 2-process CPU run in ``test_multiprocess.py`` (also the reference run).

Run by the test as ``python -m tests.parallel.multiprocess_worker MESH [MESH ...]`` with
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` in its environment; each MESH is
``data,fsdp,tensor`` over the 4 global devices. For every mesh the process builds the toy
model with ``create_sharded``, places ITS half of the global batch with ``shard_batch``
(the multi-process path), runs one ``make_train_step`` update on it and a second one fed
the local rows directly, and prints one JSON line
``RESULT {...}`` with the metrics and parameter checksums (:func:`run_step`). The test
calls :func:`run_step` in its own process on 4 of its 8 devices for the reference.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm import parallel

from .toy_model import make_batch, make_toy, token_loss

GLOBAL_BATCH = 16
NUM_MICROBATCHES = 2


def _first_local(x: jax.Array) -> float:
    """A replicated scalar read on this process (works for non-fully-addressable arrays)."""
    return float(np.asarray(x.addressable_data(0)))


def run_step(mesh, devices=None) -> dict:
    """Two updates of the toy model on ``mesh``; returns their metrics and the final
    parameter checksums (per-parameter sum and sum of squares).

    On several processes each passes only its rows of the global batch (rows
    ``[i · B/n, (i + 1) · B/n)`` for process ``i`` of ``n``), which is what each process's
    devices hold under the ``('data', 'fsdp')`` batch split of a mesh whose devices are in
    process order.
    """
    rules = parallel.rules_for_role("policy")
    model = parallel.create_sharded(lambda: make_toy(seed=0), mesh, rules)
    tx = optax.adamw(1e-2, eps=1e-6, weight_decay=0.1)
    step = parallel.make_train_step(
        token_loss, model, tx, mesh, rules, num_microbatches=NUM_MICROBATCHES
    )
    state = step.init(model)
    batch = make_batch(GLOBAL_BATCH, seed=3)
    n, i = jax.process_count(), jax.process_index()
    rows = GLOBAL_BATCH // n
    local = jax.tree.map(lambda x: x[i * rows : (i + 1) * rows], batch)
    global_batch = parallel.shard_batch(local, mesh, rules, num_microbatches=NUM_MICROBATCHES)
    assert global_batch["tokens"].shape == (GLOBAL_BATCH, batch["tokens"].shape[1])
    state, metrics = step(state, global_batch)
    # a second update fed the process-local rows directly (the step places them itself)
    state, metrics_2 = step(state, local)

    # checksums computed on the mesh, returned replicated (readable on every process)
    replicated = NamedSharding(mesh, PartitionSpec())
    leaves = jax.tree.leaves(state.params)
    sums = jax.jit(
        lambda ls: [(jnp.sum(x), jnp.sum(x * x)) for x in ls], out_shardings=replicated
    )(leaves)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    return {
        "process_index": i,
        "process_count": n,
        "mesh": dict(mesh.shape),
        "loss": _first_local(metrics["loss"]),
        "grad_norm": _first_local(metrics["grad_norm"]),
        "num_tokens": _first_local(metrics["num_tokens"]),
        "loss_2": _first_local(metrics_2["loss"]),
        "grad_norm_2": _first_local(metrics_2["grad_norm"]),
        "step": int(_first_local(state.step)),
        "param_sum": {k: _first_local(s) for k, (s, _) in zip(names, sums)},
        "param_sq_sum": {k: _first_local(q) for k, (_, q) in zip(names, sums)},
    }


def main(argv: list[str]) -> None:
    # the test sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    port = int(os.environ["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[1])
    started = parallel.init_distributed(
        coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60
    )
    assert started and jax.process_count() == 2, (started, jax.process_count())
    assert jax.local_device_count() == 2 and jax.device_count() == 4, jax.devices()

    # a plain cross-process collective first: every process contributes its index
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.array([jax.process_index()], np.int32))
    print("ALLGATHER " + json.dumps(np.asarray(gathered).ravel().tolist()), flush=True)

    for spec in argv:
        sizes = tuple(int(s) for s in spec.split(","))
        mesh = parallel.make_mesh(*sizes)
        print("RESULT " + json.dumps(run_step(mesh)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
