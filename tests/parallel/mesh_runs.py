"""Shared harness of the trainer-on-mesh tests: run a trainer for a few steps on one
device and on 2×2×2 and 1×4×2 meshes of the 8 simulated CPU devices, then compare the
per-step metrics and the final parameters, and check that the mesh runs really split the
weights and that the returned model is still sharded.

Each trainer has its own ``test_mesh_<trainer>.py`` that calls :func:`check_trainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.train.loop import TrainResult

MESHES: dict[str, MeshConfig] = {
    "1x1x1": MeshConfig(1, 1, 1, num_devices=1),
    "2x2x2": MeshConfig(2, 2, 2),
    "1x4x2": MeshConfig(1, 4, 2),
}

# Wall-clock and throughput metrics differ from run to run by nature.
UNCOMPARED = ("time_", "tokens_per_s", "elapsed")


def run_on_meshes(
    run: Callable[[MeshConfig, Path], TrainResult], tmp_path: Path, meshes: dict[str, MeshConfig] = MESHES
) -> dict[str, TrainResult]:
    """``{mesh name: run(mesh, output_dir)}`` for every mesh (each run in its own folder)."""
    return {name: run(mesh, tmp_path / name) for name, mesh in meshes.items()}


def comparable_metrics(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith(UNCOMPARED)
        and k not in ("step",) and np.isfinite(float(v))
    }


def assert_same_metrics(results: dict[str, TrainResult], rtol: float = 2e-4, atol: float = 2e-5,
                        tied_at_start: tuple[str, ...] = ()) -> None:
    """Every run logged the same steps with the same metric values (float32 tolerance).

    ``tied_at_start``: metrics that at step 0 are a step function of a quantity that is
    exactly 0 by construction (e.g. DPO's reward accuracy, ``margin > 0``, while the policy
    still equals its reference): its sign there is rounding, so they are compared from
    step 1 on."""
    names = list(results)
    base = results[names[0]].history
    for name in names[1:]:
        other = results[name].history
        assert len(other) == len(base), f"{name}: {len(other)} steps logged, {names[0]}: {len(base)}"
        for step, (a, b) in enumerate(zip(base, other)):
            ma, mb = comparable_metrics(a), comparable_metrics(b)
            assert ma.keys() == mb.keys(), f"{name} step {step}: metric keys differ {ma.keys() ^ mb.keys()}"
            for key in ma:
                if step == 0 and key in tied_at_start:
                    continue
                np.testing.assert_allclose(
                    mb[key], ma[key], rtol=rtol, atol=atol,
                    err_msg=f"metric {key!r} at step {step}: {name} vs {names[0]}",
                )


def params_of(model) -> dict[str, np.ndarray]:
    """``{path: host array}`` of a model's ``nnx.Param``s."""
    state = nnx.state(model, nnx.Param)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_params(results: dict[str, TrainResult], atol: float = 3e-4, model_of=lambda r: r.model) -> None:
    """The final parameters of every run agree with those of the first run.

    ``atol``: 1% of the largest move of 3 Adam steps at lr 1e-2. Sums split across devices
    or micro-batches add in another order (float32 differences of ~1e-7); Adam's
    ``m / sqrt(v)`` turns such a difference into up to a full step where a gradient is
    near zero, so a parameter tolerance must scale with the learning rate."""
    names = list(results)
    base = params_of(model_of(results[names[0]]))
    for name in names[1:]:
        other = params_of(model_of(results[name]))
        assert other.keys() == base.keys()
        for key in base:
            np.testing.assert_allclose(other[key], base[key], atol=atol, rtol=1e-4,
                                       err_msg=f"param {key}: {name} vs {names[0]}")


def assert_sharded(model, mesh: MeshConfig) -> None:
    """The model's params live on all the mesh's devices, and the big matrices are split:
    every device holds a shard smaller than the whole array (fsdp × tensor ways for a
    param annotated with both)."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    expected_devices = mesh.data * mesh.fsdp * mesh.tensor
    split_ways = mesh.fsdp * mesh.tensor
    fully_split = 0
    for path, x in leaves:
        assert isinstance(x, jax.Array), f"{jax.tree_util.keystr(path)} is not a jax.Array"
        assert len(x.sharding.device_set) == expected_devices, (
            f"{jax.tree_util.keystr(path)} lives on {len(x.sharding.device_set)} devices, expected {expected_devices}"
        )
        shard = x.addressable_shards[0].data.shape
        if x.ndim >= 2 and np.prod(shard) * split_ways == np.prod(x.shape):
            fully_split += 1
    assert fully_split >= len(leaves) // 3, (
        f"only {fully_split} of {len(leaves)} params are split {split_ways} ways on mesh {mesh}"
    )


def check_trainer(
    run: Callable[[MeshConfig, Path], TrainResult],
    tmp_path: Path,
    *,
    model_of=lambda r: r.model,
    metric_rtol: float = 2e-4,
    metric_atol: float = 2e-5,
    param_atol: float = 3e-4,
    tied_at_start: tuple[str, ...] = (),
) -> dict[str, TrainResult]:
    """Run on every mesh of ``MESHES`` and assert equal metrics, equal final params
    (``param_atol``: see :func:`assert_same_params`) and a really sharded result on the
    multi-device meshes."""
    results = run_on_meshes(run, tmp_path)
    assert_same_metrics(results, rtol=metric_rtol, atol=metric_atol, tied_at_start=tied_at_start)
    assert_same_params(results, atol=param_atol, model_of=model_of)
    for name, mesh in MESHES.items():
        if mesh.num_devices != 1:
            assert_sharded(model_of(results[name]), mesh)
    return results
