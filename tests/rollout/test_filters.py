"""Tests for jaxrl_llm.rollout.filters against the transformers PyTorch logits warpers."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxrl_llm.rollout import filters

B, V = 16, 50


def _random_logits(seed: int = 0, batch: int = B, vocab: int = V, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def _hf(processor, logits: np.ndarray, input_ids: np.ndarray | None = None) -> np.ndarray:
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else torch.from_numpy(input_ids)
    return processor(ids, torch.from_numpy(logits.copy())).numpy()


def _kept(x) -> np.ndarray:
    return np.asarray(filters.is_kept(jnp.asarray(x))) if not isinstance(x, np.ndarray) or x.dtype != bool else x


def _hf_kept(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x)


# ---------------------------------------------------------------------------------------
# Agreement with transformers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    x = _random_logits(1)
    ours = np.asarray(filters.apply_temperature(x, temperature))
    np.testing.assert_allclose(ours, _hf(TemperatureLogitsWarper(temperature), x), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 7, 49, 50, 80])
def test_top_k_matches_hf(k):
    x = _random_logits(2)
    ours = np.asarray(filters.top_k_filter(x, k))
    ref = _hf(TopKLogitsWarper(k), x)
    np.testing.assert_array_equal(_kept(ours), _hf_kept(ref))
    np.testing.assert_array_equal(ours[_hf_kept(ref)], ref[_hf_kept(ref)])
    assert (_kept(ours).sum(-1) == min(k, V)).all()


def test_top_k_ties_keep_all_tied_entries():
    x = np.array([[1.0, 3.0, 2.0, 2.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], np.float32)
    ours = _kept(filters.top_k_filter(x, 2))
    expected = np.array([[0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(ours, _hf_kept(_hf(TopKLogitsWarper(2), x)))


@pytest.mark.parametrize("p", [0.01, 0.2, 0.5, 0.9, 0.99])
def test_top_p_matches_hf(p):
    x = _random_logits(3, batch=64)
    ours = np.asarray(filters.top_p_filter(x, p))
    ref = _hf(TopPLogitsWarper(p), x)
    np.testing.assert_array_equal(_kept(ours), _hf_kept(ref))
    np.testing.assert_array_equal(ours[_hf_kept(ref)], ref[_hf_kept(ref)])


@pytest.mark.parametrize("p", [0.2, 0.7, 0.95])
def test_top_p_is_smallest_set_with_mass_at_least_p(p):
    """Independent check from the definition (numpy, per row)."""
    x = _random_logits(4, batch=32)
    kept = _kept(filters.top_p_filter(x, p))
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row in range(x.shape[0]):
        order = np.argsort(-probs[row])
        mass = np.cumsum(probs[row][order])
        n = int(np.searchsorted(mass, p - 1e-6) + 1)  # smallest prefix with mass >= p
        expected = np.zeros(V, bool)
        expected[order[:n]] = True
        np.testing.assert_array_equal(kept[row], expected)


def test_filter_properties_idempotence_and_monotonicity():
    x = _random_logits(18, batch=32)
    once = filters.top_k_filter(x, 7)
    np.testing.assert_array_equal(np.asarray(filters.top_k_filter(once, 7)), np.asarray(once))
    once = filters.min_p_filter(x, 0.1)  # ratios to the max are unchanged by filtering
    np.testing.assert_array_equal(_kept(filters.min_p_filter(once, 0.1)), _kept(once))
    previous = np.zeros_like(x, bool)
    for p in [0.05, 0.3, 0.6, 0.9, 0.999]:
        kept = _kept(filters.top_p_filter(x, p))
        assert (previous <= kept).all(), "top-p kept set must grow with p"
        probs = np.asarray(jax.nn.softmax(x, -1))
        assert ((probs * kept).sum(-1) >= p - 1e-5).all()
        previous = kept


def test_top_p_always_keeps_most_likely_token():
    x = np.array([[10.0, 0.0, -1.0, -2.0]], np.float32)  # argmax carries > 99.9% of the mass
    kept = _kept(filters.top_p_filter(x, 1e-6))
    np.testing.assert_array_equal(kept, [[True, False, False, False]])


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(min_p):
    x = _random_logits(5, batch=32)
    ours = np.asarray(filters.min_p_filter(x, min_p))
    ref = _hf(MinPLogitsWarper(min_p), x)
    np.testing.assert_array_equal(_kept(ours), _hf_kept(ref))
    np.testing.assert_array_equal(ours[_hf_kept(ref)], ref[_hf_kept(ref)])


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    rng = np.random.default_rng(6)
    x = _random_logits(6, batch=8)
    tokens = rng.integers(0, V, size=(8, 12))
    mask = rng.random((8, 12)) < 0.6
    mask[0] = False  # a row with no valid previous token is unchanged
    ours = np.asarray(filters.repetition_penalty(x, tokens, mask, penalty))
    for row in range(x.shape[0]):
        ids = tokens[row][mask[row]]
        if ids.size == 0:
            np.testing.assert_array_equal(ours[row], x[row])
            continue
        ref = _hf(RepetitionPenaltyLogitsProcessor(float(penalty)), x[row : row + 1], ids[None])
        np.testing.assert_allclose(ours[row], ref[0], rtol=1e-6)


def test_repetition_penalty_hand_example():
    x = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    tokens = np.array([[0, 1, 1, 3]])  # token 1 occurs twice: penalised once
    mask = np.array([[1, 1, 1, 0]])  # token 3 is masked out
    out = np.asarray(filters.repetition_penalty(x, tokens, mask, 2.0))
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0]])


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 10, 0.9, 0.0), (1.3, 0, 0.8, 0.05), (0.5, 5, 1.0, 0.2), (2.0, 20, 0.95, 0.1)],
)
def test_process_logits_matches_hf_chain(temperature, top_k, top_p, min_p):
    x = _random_logits(7, batch=32)
    chain = [TemperatureLogitsWarper(temperature)]
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        chain.append(MinPLogitsWarper(min_p))
    ref = _hf(LogitsProcessorList(chain), x)
    ours = filters.process_logits(x, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    kept = _hf_kept(ref)
    np.testing.assert_array_equal(_kept(ours), kept)
    ref_logp = torch.log_softmax(torch.from_numpy(ref), -1).numpy()
    ours_logp = np.asarray(jax.nn.log_softmax(ours, -1))
    np.testing.assert_allclose(ours_logp[kept], ref_logp[kept], rtol=1e-5, atol=1e-5)
    assert np.isfinite(ours_logp).all()
    assert (np.exp(ours_logp)[~kept] == 0).all()


# ---------------------------------------------------------------------------------------
# jit / no-jit, traced options, numerics
# ---------------------------------------------------------------------------------------


class ProcessLogitsVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_variants_agree_with_eager_reference(self):
        x = _random_logits(8)
        fn = self.variant(
            functools.partial(filters.process_logits, temperature=0.8, top_k=12, top_p=0.9, min_p=0.05)
        )
        got = fn(x)
        ref = _hf(
            LogitsProcessorList(
                [TemperatureLogitsWarper(0.8), TopKLogitsWarper(12), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]
            ),
            x,
        )
        np.testing.assert_array_equal(_kept(got), _hf_kept(ref))

    @chex.variants(with_jit=True, without_jit=True)
    def test_sample_token_variants(self):
        x = _random_logits(9)
        fn = self.variant(functools.partial(filters.sample_token, temperature=1.0, top_k=5, top_p=0.9))
        tokens, logp = fn(jax.random.key(0), x)
        chex.assert_shape([tokens, logp], (B,))
        kept = _kept(filters.process_logits(x, top_k=5, top_p=0.9))
        assert kept[np.arange(B), np.asarray(tokens)].all()
        assert (np.asarray(logp) <= 0).all()


def test_traced_options_equal_static_options():
    x = _random_logits(10)
    static = filters.process_logits(x, temperature=0.6, top_k=8, top_p=0.7, min_p=0.1)

    @jax.jit
    def traced(x, t, p, m):
        return filters.process_logits(x, temperature=t, top_k=8, top_p=p, min_p=m)

    got = traced(x, jnp.float32(0.6), jnp.float32(0.7), jnp.full((B,), 0.1, jnp.float32))
    np.testing.assert_array_equal(_kept(got), _kept(static))
    np.testing.assert_allclose(np.asarray(got), np.asarray(static), rtol=1e-6)


def test_per_row_temperature_with_greedy_rows():
    x = _random_logits(11, batch=4)
    temperature = jnp.array([0.0, 1.0, 0.0, 0.5], jnp.float32)
    tokens, logp = jax.jit(filters.sample_token)(jax.random.key(1), x, temperature)
    greedy = np.argmax(x, -1)
    assert tokens[0] == greedy[0] and tokens[2] == greedy[2]
    assert logp[0] == 0.0 and logp[2] == 0.0
    assert logp[1] < 0 and logp[3] < 0


def test_no_nan_with_neg_inf_inputs_and_entropy_is_finite():
    x = _random_logits(12)
    x[:, ::3] = -np.inf  # e.g. masked vocabulary padding
    processed = filters.process_logits(x, temperature=0.9, top_k=10, top_p=0.8, min_p=0.05)
    logp = jax.nn.log_softmax(processed, -1)
    assert not np.isnan(np.asarray(logp)).any()
    assert not _kept(processed)[:, ::3].any()
    # Entropy over the finite (FILTER_VALUE) entries is finite: 0 * (-1e30) = 0.
    finite = np.isfinite(np.asarray(logp))
    p = np.exp(np.asarray(logp))
    entropy = -(np.where(finite, p * np.where(finite, np.asarray(logp), 0.0), 0.0)).sum(-1)
    assert np.isfinite(entropy).all()
    processed_plain = filters.process_logits(_random_logits(12), top_k=3)
    lp = jax.nn.log_softmax(processed_plain, -1)
    assert np.isfinite(np.asarray(-(jnp.exp(lp) * lp).sum(-1))).all()


def test_greedy():
    x = _random_logits(13)
    x[0, :] = 1.0  # all tied: lowest id wins
    tokens, logp = filters.sample_token(jax.random.key(0), x, temperature=0.0, top_k=3, top_p=0.5)
    expected = np.argmax(x, -1)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert tokens[0] == 0
    np.testing.assert_array_equal(np.asarray(logp), np.zeros(B))
    processed = filters.process_logits(x, temperature=0.0)
    assert (_kept(processed).sum(-1) == 1).all()


def test_usable_inside_while_loop():
    x = jnp.asarray(_random_logits(14, batch=2, vocab=11))

    def cond(carry):
        return carry[0] < 6

    def body(carry):
        step, rng, buf, lp = carry
        rng, sub = jax.random.split(rng)
        tok, logp = filters.sample_token(sub, x + step.astype(jnp.float32), 0.9, top_k=4, top_p=0.9)
        return step + 1, rng, buf.at[:, step].set(tok), lp.at[:, step].set(logp)

    init = (jnp.int32(0), jax.random.key(3), jnp.zeros((2, 6), jnp.int32), jnp.zeros((2, 6)))
    _, _, buf, lp = jax.jit(lambda c: jax.lax.while_loop(cond, body, c))(init)
    kept = _kept(filters.process_logits(x, temperature=0.9, top_k=4, top_p=0.9))
    for row in range(2):
        assert kept[row, np.asarray(buf[row])].all()
    assert np.isfinite(np.asarray(lp)).all()


# ---------------------------------------------------------------------------------------
# Sampling distribution
# ---------------------------------------------------------------------------------------


def test_samples_follow_filtered_distribution():
    n = 20_000
    x = _random_logits(15, batch=3, vocab=30, scale=1.5)
    kwargs = dict(temperature=0.8, top_k=12, top_p=0.85, min_p=0.02)
    processed = filters.process_logits(x, **kwargs)
    probs = np.asarray(jax.nn.softmax(processed, -1), np.float64)
    keys = jax.random.split(jax.random.key(42), n)
    tokens, logp = jax.jit(jax.vmap(lambda k: filters.sample_token(k, x, **kwargs)))(keys)
    tokens = np.asarray(tokens)  # [n, B]
    kept = _kept(processed)
    np.testing.assert_allclose(
        np.asarray(logp), np.log(probs[np.arange(3)[None, :], tokens]), rtol=1e-4, atol=1e-5
    )
    for row in range(3):
        assert kept[row, tokens[:, row]].all(), "sampled a filtered-out token"
        counts = np.bincount(tokens[:, row], minlength=30)
        tv = 0.5 * np.abs(counts / n - probs[row]).sum()
        assert tv < 0.02, tv
        support = kept[row]
        _, pvalue = stats.chisquare(counts[support], n * probs[row][support] / probs[row][support].sum())
        assert pvalue > 1e-3, pvalue


def test_chi_square_detects_unfiltered_distribution():
    """The frequency test above has power: raw softmax samples fail it."""
    n = 20_000
    x = _random_logits(15, batch=1, vocab=30, scale=1.5)
    processed = filters.process_logits(x, top_p=0.6)
    probs = np.asarray(jax.nn.softmax(processed, -1), np.float64)[0]
    raw = np.asarray(jax.random.categorical(jax.random.key(0), jnp.asarray(x[0]), shape=(n,)))
    counts = np.bincount(raw, minlength=30)
    assert 0.5 * np.abs(counts / n - probs).sum() > 0.05


# ---------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(min_p=-0.01), "min_p"),
        (dict(min_p=1.01), "min_p"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    x = _random_logits(16)
    with pytest.raises(ValueError, match=name):
        filters.process_logits(x, **kwargs)
    with pytest.raises(ValueError, match=name):
        filters.sample_token(jax.random.key(0), x, **kwargs)


def test_bad_arguments_individual_filters():
    x = _random_logits(17)
    with pytest.raises(ValueError, match="temperature"):
        filters.apply_temperature(x, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        filters.top_k_filter(x, -3)
    with pytest.raises(ValueError, match="top_p"):
        filters.top_p_filter(x, 2.0)
    with pytest.raises(ValueError, match="min_p"):
        filters.min_p_filter(x, 1.5)
    with pytest.raises(ValueError, match="penalty"):
        filters.repetition_penalty(x, np.zeros((B, 2), np.int32), np.ones((B, 2)), 0.0)
    with pytest.raises(ValueError, match="per-row"):
        filters.top_p_filter(x, jnp.ones((3,)) * 0.5)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\] \(rank 2\), got shape \(\d+,\)"):
        filters.top_k_filter(x[0], 2)  # rank 1: logits must be [B, V]
