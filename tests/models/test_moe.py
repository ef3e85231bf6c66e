"""MoE: top-k routing against numpy, load-balancing loss against numpy and transformers,
routing record/replay through the whole model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, MoEMLP, load_balancing_loss, route
from jaxrl_llm.models.moe import dense_experts, ragged_experts
from tests.models.helpers import VOCAB as V
from tests.models.helpers import padded_batch, small_model


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_numpy(norm):
    logits = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    gates, idx, probs = route(jnp.asarray(logits), 2, norm_topk_prob=norm)
    p = _np_softmax(logits.astype(np.float64))
    for t in range(5):
        order = np.argsort(-p[t])[:2]
        np.testing.assert_array_equal(idx[t], order)
        want = p[t, order] / (p[t, order].sum() if norm else 1.0)
        np.testing.assert_allclose(gates[t], want, rtol=1e-5)
    np.testing.assert_allclose(probs, p, rtol=1e-5)


def _np_aux(probs, idx, mask):
    """Switch/mixtral loss from its definition, plain loops."""
    n_tok, e = probs.shape
    count, psum, n = np.zeros(e), np.zeros(e), 0.0
    for t in range(n_tok):
        if mask[t]:
            n += 1
            psum += probs[t]
            for j in idx[t]:
                count[j] += 1
    return e * np.sum((count / n) * (psum / n))


def test_load_balancing_loss_matches_numpy_and_transformers():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 6, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    _, idx, probs = route(jnp.asarray(logits), 2, norm_topk_prob=True)
    got = load_balancing_loss(probs, idx, jnp.asarray(mask))
    want = _np_aux(
        np.asarray(probs).reshape(-1, 5), np.asarray(idx).reshape(-1, 2), mask.reshape(-1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    hf = load_balancing_loss_func((torch.tensor(logits.reshape(-1, 5)),), 5, 2, torch.tensor(mask))
    np.testing.assert_allclose(got, hf.item(), rtol=1e-5)
    # uniform routing gives the minimum, k.
    uniform = jnp.full((4, 4), 0.25)
    np.testing.assert_allclose(
        load_balancing_loss(uniform, jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]])), 2.0, rtol=1e-6
    )


def test_moe_layer_matches_per_token_loop():
    layer = MoEMLP(32, 24, 4, 2, norm_topk_prob=False, rngs=nnx.Rngs(0))
    nnx.update(layer, jax.tree.map(lambda x: x * 10, nnx.state(layer)))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 12, 32)), jnp.float32)
    y, idx, _ = layer(x)
    w_r, wg, wu, wd = (
        np.asarray(p[...], np.float64)
        for p in (layer.router, layer.gate_proj, layer.up_proj, layer.down_proj)
    )
    xs = np.asarray(x, np.float64)
    for b in range(3):
        for t in range(0, 12, 5):
            p = _np_softmax(xs[b, t] @ w_r)
            top = np.argsort(-p)[:2]
            np.testing.assert_array_equal(idx[b, t], top)
            out = sum(
                p[e]
                * (
                    ((lambda g: g / (1 + np.exp(-g)))(xs[b, t] @ wg[e]) * (xs[b, t] @ wu[e]))
                    @ wd[e]
                )
                for e in top
            )
            np.testing.assert_allclose(y[b, t], out, atol=1e-5)


def _moe_model(family="qwen3_moe", seed=0):
    return small_model(family, seed)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_routing_replay_reproduces_output_and_fixes_choices(family):
    model = _moe_model(family)
    tokens, mask, _ = padded_batch(np.random.default_rng(3), (12, 7, 3), 12, "right", vocab=V)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    out = model.forward(tokens, attention_mask=mask)
    assert out.routing.shape == (2, 3, 12, 2) and out.routing.dtype == jnp.int32
    replay = model.forward(tokens, attention_mask=mask, routing=out.routing)
    np.testing.assert_array_equal(replay.logits, out.logits)
    np.testing.assert_array_equal(replay.routing, out.routing)

    # perturb the routers slightly: some expert choices change ...
    key = jax.random.key(0)
    changed = 0.0
    for scale in (1e-2, 3e-2, 1e-1):
        pert = nnx.clone(model)
        for layer in pert.model.layers:
            w = layer.mlp.router[...]
            layer.mlp.router[...] = w + scale * jnp.std(w) * jax.random.normal(key, w.shape)
        free = pert.forward(tokens, attention_mask=mask)
        changed = float(jnp.mean((free.routing != out.routing).any(-1)[:, mask == 1]))
        if changed > 0:
            break
    assert 0 < changed < 0.5, changed
    # ... and replaying the recorded routing removes that difference in choices,
    replayed = pert.forward(tokens, attention_mask=mask, routing=out.routing)
    np.testing.assert_array_equal(replayed.routing, out.routing)
    # leaving only the small change of the gate values.
    valid = np.asarray(mask) == 1
    d_replay = np.abs(np.asarray(replayed.logits - out.logits))[valid].mean()
    d_free = np.abs(np.asarray(free.logits - out.logits))[valid].mean()
    assert d_replay < d_free


def test_aux_loss_is_layer_mean_and_dense_is_zero():
    model = _moe_model()
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, V, (3, 12)))
    out = model.forward(tokens)
    assert out.aux_loss.shape == () and 1.9 < float(out.aux_loss) < 4.0  # k ≤ aux ≤ k·E
    dense = small_model("llama").forward(tokens)
    assert dense.routing is None and float(dense.aux_loss) == 0.0


def test_replay_shape_is_checked():
    model = _moe_model()
    tokens = jnp.zeros((3, 12), jnp.int32)
    with pytest.raises(ValueError, match=r"routing has shape \(2, 3, 12, 3\), expected \[M, B, T, k\]"):
        model.forward(tokens, routing=jnp.zeros((2, 3, 12, 3), jnp.int32))


def test_ragged_experts_equal_dense_values_and_grads():
    rng = np.random.default_rng(6)
    n, d, f, e, k = 36, 32, 24, 4, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    ws = [
        jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
        for s in ((e, d, f), (e, d, f), (e, f, d))
    ]
    idx = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(n)]), jnp.int32)
    gates = jnp.asarray(rng.random((n, k)), jnp.float32)

    def run(fn):
        return jax.value_and_grad(
            lambda x, g, *w: jnp.sum(jnp.sin(fn(x, idx, g, *w))), argnums=(0, 1, 2, 3, 4)
        )(x, gates, *ws)

    chex.assert_trees_all_close(run(ragged_experts), run(dense_experts), atol=1e-4, rtol=1e-4)


def test_ragged_impl_model_matches_dense():
    dense = small_model("qwen3_moe")
    ragged = CausalLM(dense.config, rngs=nnx.Rngs(0), moe_impl="ragged")
    nnx.update(ragged, nnx.state(dense))
    tokens, mask, _ = padded_batch(np.random.default_rng(7), (12, 7, 3), 12, "left")
    a = dense.forward(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    b = ragged.forward(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(a.routing, b.routing)
    chex.assert_trees_all_close(a.logits, b.logits, atol=1e-4)
    with pytest.raises(ValueError, match="moe impl"):
        CausalLM(dense.config, rngs=nnx.Rngs(0), moe_impl="loop")


def test_router_z_loss_matches_numpy_and_is_reported_per_model():
    from jaxrl_llm.models.moe import router_z_loss

    rng = np.random.default_rng(11)
    logits = rng.normal(size=(2, 5, 4)).astype(np.float32) * 3
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    want = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                want.append(np.log(np.sum(np.exp(logits[b, t].astype(np.float64)))) ** 2)
    np.testing.assert_allclose(router_z_loss(jnp.asarray(logits), jnp.asarray(mask)), np.mean(want), rtol=1e-5)
    model = small_model("qwen3_moe", 0)
    tokens, tmask, _ = padded_batch(np.random.default_rng(3), (12, 7, 3), 12, "right", vocab=V)
    out = model.forward(jnp.asarray(tokens), attention_mask=jnp.asarray(tmask))
    assert out.router_z_loss.shape == () and float(out.router_z_loss) > 0.0
    grads = jax.grad(lambda m: m.forward(jnp.asarray(tokens), attention_mask=jnp.asarray(tmask)).router_z_loss)(model)
    router_grad = grads.model.layers[0].mlp.router[...]
    assert float(jnp.abs(router_grad).sum()) > 0.0  # the z-loss trains the router
