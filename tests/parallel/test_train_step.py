"""Tests for jaxrl_llm.parallel.train_step: same step on 1 or 8 devices; global token-mean accumulation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import (
    accumulate_gradients,
    make_mesh,
    make_train_step,
    shard_model,
    split_microbatches,
)

from .toy_model import make_batch, make_toy, token_loss

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]
TOL = dict(rtol=1e-5, atol=1e-6)
K = 4  # micro-batches in the accumulation test


B1 = 0.9


def _tx():
    # no clipping: after one step Adam's first moment is exactly (1 - b1) * grads.
    # eps=1e-6: Adam's first update is ~g / (|g| + eps), which amplifies reduction-order
    # noise in near-zero gradients when eps is tiny.
    return optax.adamw(1e-2, b1=B1, eps=1e-6, weight_decay=0.1)


def _accumulation_batch(k):
    """Rows with index ≡ 0 (mod k) are long (8 targets), the others have 1 target:
    micro-batch 0 (rows 0::k) holds far more tokens than the others."""
    batch = make_batch(16, seed=2, ragged=False)
    lengths = np.where(np.arange(16) % k == 0, 9, 2)
    batch["mask"] = (np.arange(9)[None, :] < lengths[:, None]).astype(np.float32)
    return batch


def _fresh_model(toy_state):
    model = nnx.eval_shape(make_toy)
    nnx.update(model, toy_state)
    return model


@pytest.fixture(scope="module")
def per_mesh(toy_state):
    """For each mesh: (step, state after init, new state, metrics) on the same ragged batch."""
    batch = _accumulation_batch(K)
    out = {}
    for sizes in MESHES:
        devices = jax.devices()[:1] if sizes == (1, 1, 1) else None
        mesh = make_mesh(*sizes, devices=devices)
        model = shard_model(_fresh_model(toy_state), mesh)
        step = make_train_step(token_loss, model, _tx(), mesh, donate=False)
        state = step.init(model)
        new_state, metrics = step(state, batch)
        out[sizes] = (step, state, new_state, metrics)
    return out


def _grads_from_adam(state):
    """grads of the first step, read back from Adam's first moment mu = (1 - b1) * g."""
    return jax.tree.map(lambda m: m / (1 - B1), state.opt_state[0].mu)


def test_same_step_on_every_mesh(per_mesh):
    _, ref_state, ref_metrics = jax.device_get(per_mesh[(1, 1, 1)][1:])
    assert ref_metrics["num_tokens"] == _accumulation_batch(K)["mask"][:, 1:].sum()
    ref_grads = _grads_from_adam(ref_state)
    assert float(ref_metrics["grad_norm"]) > 0.1
    np.testing.assert_allclose(optax.tree.norm(ref_grads), ref_metrics["grad_norm"], rtol=1e-5)
    for sizes, (_, _, new_state, metrics) in per_mesh.items():
        new_state, metrics = jax.device_get((new_state, metrics))
        chex.assert_trees_all_close(metrics, ref_metrics, **TOL)  # loss, grad_norm, num_tokens
        chex.assert_trees_all_close(_grads_from_adam(new_state), ref_grads, **TOL)
        chex.assert_trees_all_close(new_state.params, ref_state.params, **TOL)
        chex.assert_trees_all_close(new_state.opt_state, ref_state.opt_state, **TOL)
        assert int(new_state.step) == 1, sizes
    # the update did something (so the comparison above is not vacuous)
    before = jax.device_get(per_mesh[(1, 1, 1)][1].params)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(before, ref_state.params, **TOL)


def test_loss_is_global_token_mean(per_mesh, toy_state):
    batch = _accumulation_batch(K)
    loss_sum, (num_tokens, _) = jax.jit(token_loss)(_fresh_model(toy_state), batch)
    loss = per_mesh[(2, 2, 2)][3]["loss"]
    np.testing.assert_allclose(loss, loss_sum / num_tokens, rtol=1e-5)


def test_params_and_optimizer_state_sharded_by_rules(per_mesh):
    _, _, state, _ = per_mesh[(2, 2, 2)]
    block = state.params["blocks"][0]
    assert block["q"][...].sharding.spec == P("fsdp", "tensor")
    assert block["down"][...].sharding.spec == P("tensor", "fsdp")
    assert state.params["embed"][...].sharding.spec == P("tensor", "fsdp")
    assert block["mlp_norm"]["scale"][...].sharding.spec == P()
    adam = state.opt_state[0]
    for moment in (adam.mu, adam.nu):
        specs = lambda tree: [(jax.tree_util.keystr(k), x.sharding.spec)
                              for k, x in jax.tree_util.tree_leaves_with_path(tree)]
        assert specs(moment) == specs(state.params)
    assert adam.count.sharding.spec == P()
    # FSDP mesh: embed split 4 ways, nothing over tensor
    _, _, state, _ = per_mesh[(2, 4, 1)]
    assert state.params["blocks"][1]["gate"][...].addressable_shards[0].data.shape == (16 // 4, 32)


def test_gradient_accumulation_matches_big_batch(per_mesh, toy_state):
    """k micro-batches with very different token counts == one big batch, global token mean."""
    k = K
    batch = _accumulation_batch(k)
    step, state, big_state, big_metrics = per_mesh[(2, 2, 2)]
    g_big = jax.device_get(_grads_from_adam(big_state))
    acc = make_train_step(token_loss, step.model(state), _tx(), step.mesh, num_microbatches=k, donate=False)
    g_acc = jax.device_get(acc.grads(state, batch))
    np.testing.assert_allclose(g_acc.num_tokens, batch["mask"][:, 1:].sum())
    chex.assert_trees_all_close(g_acc.loss, big_metrics["loss"], **TOL)
    chex.assert_trees_all_close(g_acc.grads, g_big, **TOL)

    # the naive mean of per-micro-batch token means is a different (wrong) gradient
    graphdef, params, rest = nnx.split(_fresh_model(toy_state), nnx.Param, ...)
    one = jax.jit(lambda p, r, b: accumulate_gradients(token_loss, graphdef, p, r, b))
    micro = [one(params, rest, jax.tree.map(lambda x: x[j::k], batch)) for j in range(k)]
    naive = jax.tree.map(lambda *g: sum(g) / k, *[m.grads for m in micro])
    tokens = [float(m.num_tokens) for m in micro]
    assert tokens[0] > 3 * tokens[1], tokens  # the split really is ragged
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(jax.device_get(naive), g_big, **TOL)
    # ...while the token-weighted combination of the same micro-batches is right
    weighted = jax.tree.map(lambda *g: sum(t * x for t, x in zip(tokens, g)) / sum(tokens),
                            *[m.grads for m in micro])
    chex.assert_trees_all_close(jax.device_get(weighted), g_big, **TOL)

    # no valid token at all: loss and grads are 0, not NaN
    empty = jax.tree.map(lambda x: x[0::k], batch)
    empty["mask"] = np.zeros_like(empty["mask"])
    res = jax.device_get(one(params, rest, empty))
    assert res.loss == 0.0 and res.num_tokens == 0.0
    assert all(np.all(g == 0) for g in jax.tree.leaves(res.grads))


def test_split_microbatches_is_strided():
    batch = {"x": jnp.arange(12).reshape(6, 2), "coef": jnp.float32(0.5)}
    mbs = split_microbatches(batch, 3)
    chex.assert_shape(mbs["x"], (3, 2, 2))
    np.testing.assert_array_equal(mbs["x"][1], batch["x"][1::3])
    np.testing.assert_array_equal(mbs["coef"], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="num_microbatches=4"):
        split_microbatches(batch, 4)
    with pytest.raises(ValueError, match="num_microbatches"):
        split_microbatches(batch, 0)


def test_step_rejects_indivisible_batch(per_mesh):
    step, state = per_mesh[(8, 1, 1)][:2]
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        step(state, make_batch(12))


def test_bad_loss_fn_output(toy_state):
    graphdef, params, rest = nnx.split(_fresh_model(toy_state), nnx.Param, ...)
    batch = make_batch(2)
    with pytest.raises(ValueError, match=r"\(loss_sum, \(num_tokens, metrics\)\)"):
        accumulate_gradients(lambda m, b: jnp.sum(b["mask"]), graphdef, params, rest, batch)


class _DropoutLinear(nnx.Module):
    """One [D, F] layer with dropout: its RNG state lives in the non-trainable ``rest``."""

    def __init__(self, *, rngs: nnx.Rngs):
        w = jax.random.normal(rngs.params(), (8, 16)) / 4
        self.w = nnx.Param(w, out_sharding=("embed", "mlp"), eager_sharding=False)
        self.frozen = nnx.Variable(jnp.ones((16,)))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))

    def __call__(self, x):
        return self.dropout(x @ self.w[...]) * self.frozen[...]


def test_non_trainable_state_is_carried_through_microbatches():
    mesh = make_mesh(2, 2, 2)

    def loss_fn(model, batch):
        y = model(batch["x"])  # [B, F]
        return jnp.sum(y**2 * batch["mask"][:, None]), (jnp.sum(batch["mask"]), {})

    model = _DropoutLinear(rngs=nnx.Rngs(0))
    step = make_train_step(loss_fn, model, optax.sgd(0.1), mesh, num_microbatches=2)
    state = step.init(model)
    count = lambda s: int(s.rest["dropout"]["rngs"]["count"][...])
    before = count(state)
    batch = {"x": np.ones((8, 8), np.float32), "mask": np.ones((8,), np.float32)}
    state, metrics = step(state, batch)
    assert count(state) == before + 2  # one dropout draw per micro-batch, carried by the scan
    assert np.isfinite(metrics["loss"]) and metrics["num_tokens"] == 8
    np.testing.assert_array_equal(state.rest["frozen"][...], np.ones(16))  # not trained
    assert state.params["w"][...].sharding.spec == P("fsdp", "tensor")
