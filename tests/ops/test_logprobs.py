"""Tests for jaxrl_llm.ops.logprobs against float64 numpy loops written from the definitions."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from jaxrl_llm.ops.logprobs import (
    entropy_from_logits,
    logprobs_from_hidden,
    token_logprobs,
)

# --------------------------------------------------------------------------------------
# Independent references: plain loops over (b, t), float64, from the definitions.
# --------------------------------------------------------------------------------------


def _np_log_softmax_row(z):
    """log p_v = z_v − log Σ_u exp(z_u), shifted by max for stability."""
    z = np.asarray(z, np.float64)
    m = np.max(z)
    return z - (m + math.log(sum(math.exp(zu - m) for zu in z)))


def _np_token_logprobs(logits, tokens):
    B, T, _ = logits.shape
    out = np.zeros((B, T), np.float64)
    for b in range(B):
        for t in range(T):
            out[b, t] = _np_log_softmax_row(logits[b, t])[tokens[b, t]]
    return out


def _np_entropy(logits):
    """H = −Σ_v p_v log p_v, terms with p_v = 0 contribute 0."""
    B, T, _ = logits.shape
    out = np.zeros((B, T), np.float64)
    for b in range(B):
        for t in range(T):
            logp = _np_log_softmax_row(logits[b, t])
            out[b, t] = -sum(math.exp(lp) * lp for lp in logp if np.isfinite(lp))
    return out


def _np_loss_from_hidden(hidden, unembed, tokens, w_logp, w_ent):
    """Σ w_logp · logp + Σ w_ent · entropy, with logits = hidden @ unembed, all float64."""
    logits = np.einsum("btd,dv->btv", hidden, unembed)
    return np.sum(w_logp * _np_token_logprobs(logits, tokens)) + np.sum(
        w_ent * _np_entropy(logits)
    )


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _naive(hidden, unembed, tokens):
    """The path logprobs_from_hidden must match: full float32 logits, then the two ops."""
    logits = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32)
    return token_logprobs(logits, tokens), entropy_from_logits(logits)


def _inputs(seed, B, T, D, V, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)) * scale, dtype)
    unembed = jnp.asarray(rng.normal(size=(D, V)) / math.sqrt(D), dtype)
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    w_logp = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    w_ent = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    return hidden, unembed, tokens, w_logp, w_ent


def _mixed_loss(fn):
    def loss(hidden, unembed, tokens, w_logp, w_ent):
        logp, ent = fn(hidden, unembed, tokens)
        return jnp.sum(w_logp * logp) + jnp.sum(w_ent * ent)

    return loss


def _chunked(chunk_size):
    return lambda h, w, t: logprobs_from_hidden(h, w, t, chunk_size=chunk_size)


_jit_chunked = jax.jit(logprobs_from_hidden, static_argnames="chunk_size")
_jit_from_logits = jax.jit(lambda z, t: (token_logprobs(z, t), entropy_from_logits(z)))


# --------------------------------------------------------------------------------------
# token_logprobs / entropy_from_logits vs numpy loops.
# --------------------------------------------------------------------------------------


class FromLogitsTest(chex.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.logits = rng.normal(size=(2, 5, 11)) * 3.0
        self.logits[0, 1] *= 40.0  # large logits: needs the max-shift
        self.logits[1, 2] += 1e4  # large constant offset: softmax is shift invariant
        self.tokens = rng.integers(0, 11, size=(2, 5))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_token_logprobs_matches_numpy(self, dtype):
        logits = jnp.asarray(self.logits, dtype)
        got = self.variant(token_logprobs)(logits, jnp.asarray(self.tokens))
        expected = _np_token_logprobs(np.asarray(logits.astype(jnp.float32)), self.tokens)
        self.assertEqual(got.dtype, jnp.float32)
        chex.assert_trees_all_close(got, expected.astype(np.float32), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_entropy_matches_numpy(self, dtype):
        logits = jnp.asarray(self.logits, dtype)
        got = self.variant(entropy_from_logits)(logits)
        expected = _np_entropy(np.asarray(logits.astype(jnp.float32)))
        self.assertEqual(got.dtype, jnp.float32)
        chex.assert_trees_all_close(got, expected.astype(np.float32), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_vocab_minus_inf(self):
        """−inf logits (e.g. after top-k filtering) have probability 0 and add no entropy."""
        logits = np.array(self.logits, np.float32)  # the reference sees the same f32 values
        logits[:, :, 3:7] = -np.inf
        tokens = np.where((self.tokens >= 3) & (self.tokens < 7), 0, self.tokens)
        logp = self.variant(token_logprobs)(jnp.asarray(logits), jnp.asarray(tokens))
        ent = self.variant(entropy_from_logits)(jnp.asarray(logits))
        chex.assert_tree_all_finite((logp, ent))
        chex.assert_trees_all_close(logp, _np_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(ent, _np_entropy(logits), rtol=1e-5, atol=1e-5)

    def test_uniform_logits_have_max_entropy(self):
        ent = entropy_from_logits(jnp.zeros((1, 3, 7)))
        chex.assert_trees_all_close(ent, jnp.full((1, 3), math.log(7.0)), rtol=1e-6)

    def test_bad_inputs(self):
        logits = jnp.zeros((2, 3, 5))
        with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] \(rank 3\), got shape \(3, 5\)"):
            token_logprobs(logits[0], jnp.zeros((3,), jnp.int32))
        with pytest.raises(ValueError, match=r"tokens has shape \(2, 4\): its first 2 dimensions must match logits \(shape \(2, 3, 5\)\)"):
            token_logprobs(logits, jnp.zeros((2, 4), jnp.int32))
        with pytest.raises(ValueError, match="tokens must be an integer array"):
            token_logprobs(logits, jnp.zeros((2, 3), jnp.float32))
        with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
            entropy_from_logits(logits[0])


# --------------------------------------------------------------------------------------
# logprobs_from_hidden: values and gradients vs the naive path.
# --------------------------------------------------------------------------------------

# (B, T, chunk_size): divides B·T, does not divide it, larger than B·T, chunk of 1.
_CHUNK_CASES = [(2, 8, 4), (3, 7, 5), (2, 5, 64), (1, 3, 1), (4, 6, 24)]


@pytest.mark.parametrize("B,T,chunk_size", _CHUNK_CASES)
def test_from_hidden_values_match_naive(B, T, chunk_size):
    hidden, unembed, tokens, _, _ = _inputs(1, B, T, D=16, V=37)
    logp, ent = jax.jit(_chunked(chunk_size))(hidden, unembed, tokens)
    logp_ref, ent_ref = _naive(hidden, unembed, tokens)
    assert logp.dtype == ent.dtype == jnp.float32
    chex.assert_shape([logp, ent], (B, T))
    chex.assert_trees_all_close((logp, ent), (logp_ref, ent_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,T,chunk_size", _CHUNK_CASES)
def test_from_hidden_grads_match_naive(B, T, chunk_size):
    args = _inputs(2, B, T, D=16, V=37, scale=2.0)
    grad = lambda f: jax.jit(jax.value_and_grad(_mixed_loss(f), argnums=(0, 1)))
    value, grads = grad(_chunked(chunk_size))(*args)
    value_ref, grads_ref = grad(_naive)(*args)
    chex.assert_trees_all_close(value, value_ref, rtol=1e-5)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_from_hidden_grads_each_output(which):
    """Each output alone drives both gradients (catches a wrong branch hidden by the mix)."""
    hidden, unembed, tokens, w_logp, w_ent = _inputs(3, 2, 6, D=8, V=19)
    if which == "logp":
        w_ent = jnp.zeros_like(w_ent)
    else:
        w_logp = jnp.zeros_like(w_logp)
    grad = lambda f: jax.jit(jax.grad(_mixed_loss(f), argnums=(0, 1)))
    grads = grad(_chunked(5))(hidden, unembed, tokens, w_logp, w_ent)
    grads_ref = grad(_naive)(hidden, unembed, tokens, w_logp, w_ent)
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in grads)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-6)


def test_from_hidden_grads_match_finite_differences():
    """Central differences of the float64 numpy loss (no JAX autodiff in the reference)."""
    hidden, unembed, tokens, w_logp, w_ent = _inputs(4, 1, 3, D=4, V=6, scale=1.5)
    np_args = [np.asarray(x, np.float64) for x in (hidden, unembed)]
    np_tokens, np_wl, np_we = (np.asarray(x) for x in (tokens, w_logp, w_ent))
    eps = 1e-6  # truncation error O(eps²) ~ 1e-12, rounding O(1e-16 / eps) ~ 1e-10

    def fd_grad(i):
        g = np.zeros_like(np_args[i])
        for idx in np.ndindex(g.shape):
            plus = [a.copy() for a in np_args]
            minus = [a.copy() for a in np_args]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            g[idx] = (
                _np_loss_from_hidden(*plus, np_tokens, np_wl, np_we)
                - _np_loss_from_hidden(*minus, np_tokens, np_wl, np_we)
            ) / (2 * eps)
        return g

    expected = (fd_grad(0), fd_grad(1))
    got = jax.grad(_mixed_loss(_chunked(2)), argnums=(0, 1))(hidden, unembed, tokens, w_logp, w_ent)
    # The JAX side runs in float32: relative error ~1e-6 per term; 1e-4 leaves margin.
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)


def test_from_hidden_bf16():
    hidden32, unembed32, tokens, w_logp, w_ent = _inputs(5, 2, 9, D=32, V=50)
    hidden, unembed = hidden32.astype(jnp.bfloat16), unembed32.astype(jnp.bfloat16)
    logp, ent = jax.jit(_chunked(4))(hidden, unembed, tokens)
    assert logp.dtype == ent.dtype == jnp.float32
    # Same bf16 inputs, float32 accumulation on both sides: agree to float32 rounding.
    chex.assert_trees_all_close((logp, ent), _naive(hidden, unembed, tokens), rtol=1e-5, atol=1e-5)
    # Against float32 math on the unrounded inputs: within bf16 precision (2^-8 ≈ 4e-3
    # relative per input, a few such errors add up over D = 32 products).
    chex.assert_trees_all_close(
        (logp, ent), _naive(hidden32, unembed32, tokens), rtol=2e-2, atol=2e-2
    )
    grad = lambda f: jax.jit(jax.grad(_mixed_loss(f), argnums=(0, 1)))
    g = grad(_chunked(4))(hidden, unembed, tokens, w_logp, w_ent)
    g_ref = grad(_naive)(hidden32, unembed32, tokens, w_logp, w_ent)
    assert g[0].dtype == g[1].dtype == jnp.bfloat16
    f32 = lambda x: x.astype(jnp.float32)
    chex.assert_trees_all_close(jax.tree.map(f32, g), g_ref, rtol=2e-2, atol=2e-2)


def test_from_hidden_vmap_and_grad_of_vmap():
    """vmap over an outer axis (shared unembed) == a Python loop over that axis."""
    hidden, unembed, tokens, _, _ = _inputs(6, 2, 5, D=8, V=13)
    hs = jnp.stack([hidden, 2.0 * hidden, -hidden])
    ts = jnp.stack([tokens, tokens[::-1], (tokens + 1) % 13])
    f = _chunked(3)
    got = jax.jit(jax.vmap(f, in_axes=(0, None, 0)))(hs, unembed, ts)
    expected = [jax.jit(f)(hs[i], unembed, ts[i]) for i in range(3)]
    expected = jax.tree.map(lambda *x: jnp.stack(x), *expected)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)

    def loss(f, w):
        logp, ent = jax.vmap(f, in_axes=(0, None, 0))(hs, w, ts)
        return jnp.sum(logp) - 0.3 * jnp.sum(ent)

    chex.assert_trees_all_close(
        jax.jit(jax.grad(lambda w: loss(f, w)))(unembed),
        jax.jit(jax.grad(lambda w: loss(_naive, w)))(unembed),
        rtol=1e-5,
        atol=1e-6,
    )


def test_out_of_range_token_ids_give_nan():
    """−100 (an ignore index) or V must not silently wrap to a real token: NaN, both paths."""
    hidden, unembed, tokens, _, _ = _inputs(8, 2, 4, D=6, V=9)
    tokens = tokens.at[0, 1].set(-100).at[1, 3].set(9).at[1, 0].set(-1)
    bad = np.zeros((2, 4), bool)
    bad[0, 1] = bad[1, 3] = bad[1, 0] = True
    logits = jnp.einsum("btd,dv->btv", hidden, unembed)
    for logp, ent in [
        (token_logprobs(logits, tokens), entropy_from_logits(logits)),
        _jit_chunked(hidden, unembed, tokens, chunk_size=3),
    ]:
        np.testing.assert_array_equal(np.isnan(logp), bad)
        chex.assert_tree_all_finite(ent)


def test_from_hidden_sharded_batch_stays_local():
    """Batch sharded over 8 devices: same values/grads as one device, no all-gather."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    row, rep = jax.sharding.NamedSharding(mesh, P("data")), jax.sharding.NamedSharding(mesh, P())
    hidden, unembed, tokens, w_logp, w_ent = _inputs(9, 16, 12, D=8, V=64)
    sharded = [jax.device_put(x, s) for x, s in zip(
        (hidden, unembed, tokens, w_logp, w_ent), (row, rep, row, row, row))]
    fwd = jax.jit(_chunked(32))
    vg = jax.jit(jax.value_and_grad(_mixed_loss(_chunked(32)), argnums=(0, 1)))
    chex.assert_trees_all_close(
        fwd(*sharded[:3]), _naive(hidden, unembed, tokens), rtol=1e-5, atol=1e-6
    )
    ref_vg = jax.value_and_grad(_mixed_loss(_naive), argnums=(0, 1))
    ref = ref_vg(hidden, unembed, tokens, w_logp, w_ent)
    chex.assert_trees_all_close(vg(*sharded), ref, rtol=1e-5, atol=1e-6)
    assert "all-gather" not in fwd.lower(*sharded[:3]).compile().as_text()


def test_from_hidden_bad_args():
    hidden, unembed, tokens, _, _ = _inputs(7, 2, 3, D=4, V=5)
    for bad in (0, -2, 1.5, True, None, np.int64(0)):
        with pytest.raises(ValueError, match="chunk_size"):
            logprobs_from_hidden(hidden, unembed, tokens, chunk_size=bad)
    logprobs_from_hidden(hidden, unembed, tokens, chunk_size=np.int32(4))  # numpy ints are fine
    with pytest.raises(ValueError, match="unembed"):
        logprobs_from_hidden(hidden, unembed.T, tokens)
    with pytest.raises(ValueError, match="tokens"):
        logprobs_from_hidden(hidden, unembed, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 2\): its first 2 dimensions must match hidden"):
        logprobs_from_hidden(hidden, unembed, tokens[:, :2])
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\] \(rank 3\)"):
        logprobs_from_hidden(hidden[0], unembed, tokens)
    with pytest.raises(ValueError, match=r"unembed must be \[D, V\] \(rank 2\)"):
        logprobs_from_hidden(hidden, unembed[0], tokens)


# --------------------------------------------------------------------------------------
# Memory: compile only (never executed), large vocabulary.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_from_hidden_memory_far_below_naive(dtype):
    B, T, D, V, chunk = 1, 2048, 64, 65536, 128
    specs = (
        jax.ShapeDtypeStruct((B, T, D), dtype),
        jax.ShapeDtypeStruct((D, V), dtype),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((B, T), jnp.float32),
        jax.ShapeDtypeStruct((B, T), jnp.float32),
    )
    full_logits_bytes = B * T * V * 4

    def temp_bytes(fn):
        return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes

    for name, make in [
        ("forward", lambda f: (lambda h, w, t, a, b: f(h, w, t))),
        ("value_and_grad", lambda f: jax.value_and_grad(_mixed_loss(f), argnums=(0, 1))),
    ]:
        chunked = temp_bytes(make(_chunked(chunk)))
        naive = temp_bytes(make(_naive))
        assert chunked * 8 <= naive, (name, chunked, naive)
        assert chunked < full_logits_bytes, (name, chunked, full_logits_bytes)


# --------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from([2, 7, 33]),
    scale=st.sampled_from([0.0, 1.0, 10.0, 100.0]),
    chunk_size=st.sampled_from([1, 4, 1000]),
)
def test_logprobs_nonpositive_entropy_bounded(seed, vocab, scale, chunk_size):
    hidden, unembed, tokens, _, _ = _inputs(seed % 2**32, 2, 3, D=5, V=vocab, scale=scale)
    logits = hidden @ unembed
    log_v = math.log(vocab)
    tol = 1e-5 * max(1.0, scale)
    for logp, ent in [
        _jit_from_logits(logits, tokens),
        _jit_chunked(hidden, unembed, tokens, chunk_size=chunk_size),
    ]:
        chex.assert_tree_all_finite((logp, ent))
        assert float(jnp.max(logp)) <= 0.0
        assert float(jnp.min(ent)) >= -tol
        assert float(jnp.max(ent)) <= log_v + 1e-5
