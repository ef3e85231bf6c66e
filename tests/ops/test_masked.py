"""masked_* reductions and aggregate_loss against plain numpy loops."""

import functools

import chex
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrl_llm.ops import (
    AGGREGATION_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from tests.ops.helpers import float32, ragged_mask


def ref_selected(x, mask):
    out = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t] > 0:
                out.append(float(x[b, t]))
    return out


def ref_aggregate(loss, mask, mode, norm_length=None):
    """Plain loop from the definitions in DESIGN.md."""
    b_size, t_size = loss.shape
    if mode == "token_mean":
        total, count = 0.0, 0.0
        for b in range(b_size):
            for t in range(t_size):
                if mask[b, t]:
                    total += loss[b, t]
                    count += 1
        return total / count if count else 0.0
    per_seq = []
    for b in range(b_size):
        s, n = 0.0, 0
        for t in range(t_size):
            if mask[b, t]:
                s += loss[b, t]
                n += 1
        if n == 0:
            continue
        if mode == "seq_mean_token_mean":
            per_seq.append(s / n)
        elif mode == "seq_mean_token_sum":
            per_seq.append(s)
        else:
            per_seq.append(s / (norm_length or t_size))
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


class MaskedTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = float32(rng, 6, 9)
        self.mask = ragged_mask(rng, 6, 9, holes=True)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sum_mean_var(self):
        sel = np.array(ref_selected(self.x, self.mask), np.float64)
        chex.assert_trees_all_close(self.variant(masked_sum)(self.x, self.mask), sel.sum(), rtol=1e-5)
        chex.assert_trees_all_close(self.variant(masked_mean)(self.x, self.mask), sel.mean(), rtol=1e-5)
        var_fn = self.variant(functools.partial(masked_var, unbiased=True))
        chex.assert_trees_all_close(var_fn(self.x, self.mask), sel.var(ddof=1), rtol=1e-5)
        var_fn = self.variant(functools.partial(masked_var, unbiased=False))
        chex.assert_trees_all_close(var_fn(self.x, self.mask), sel.var(ddof=0), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_per_row(self):
        out = self.variant(functools.partial(masked_mean, axis=-1))(self.x, self.mask)
        for b in range(self.x.shape[0]):
            sel = [self.x[b, t] for t in range(self.x.shape[1]) if self.mask[b, t]]
            expected = np.mean(sel) if sel else 0.0
            np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_whiten(self, shift_mean):
        out = np.asarray(self.variant(functools.partial(masked_whiten, shift_mean=shift_mean))(self.x, self.mask))
        sel = np.array(ref_selected(self.x, self.mask), np.float64)
        mean, var = sel.mean(), sel.var(ddof=1)
        for b in range(self.x.shape[0]):
            for t in range(self.x.shape[1]):
                if self.mask[b, t]:
                    expected = (self.x[b, t] - mean) / np.sqrt(var + 1e-8)
                    if not shift_mean:
                        expected += mean
                    np.testing.assert_allclose(out[b, t], expected, rtol=1e-4, atol=1e-5)
                else:
                    self.assertEqual(out[b, t], 0.0)

    def test_empty_selection_is_zero_not_nan(self):
        zeros = np.zeros_like(self.mask)
        self.assertEqual(float(masked_mean(self.x, zeros)), 0.0)
        self.assertEqual(float(masked_var(self.x, zeros)), 0.0)
        self.assertTrue(np.all(np.isfinite(masked_whiten(self.x, zeros))))

    def test_mask_shape_error_names_mask(self):
        with pytest.raises(ValueError, match="mask"):
            masked_mean(self.x, np.ones((3, 2), np.float32))


class AggregateLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*AGGREGATION_MODES)
    def test_matches_loop(self, mode):
        rng = np.random.default_rng(1)
        loss = float32(rng, 7, 11)
        mask = ragged_mask(rng, 7, 11, min_len=0, holes=True)
        mask[3] = 0.0  # a sequence with no valid token is left out of the sequence mean
        fn = self.variant(functools.partial(aggregate_loss, mode=mode))
        chex.assert_trees_all_close(fn(loss, mask), ref_aggregate(loss, mask, mode), rtol=1e-5, atol=1e-6)

    def test_norm_length(self):
        rng = np.random.default_rng(2)
        loss, mask = float32(rng, 4, 5), ragged_mask(rng, 4, 5, min_len=1)
        out = aggregate_loss(loss, mask, "seq_mean_token_sum_norm", norm_length=64)
        np.testing.assert_allclose(out, ref_aggregate(loss, mask, "seq_mean_token_sum_norm", 64), rtol=1e-5)

    def test_classic_long_short_example(self):
        """One sequence of 200 tokens and one of 10: the per-token weights each mode gives."""
        mask = np.zeros((2, 200), np.float32)
        mask[0, :200] = 1.0
        mask[1, :10] = 1.0
        import jax

        grad = lambda mode: np.asarray(jax.grad(lambda l: aggregate_loss(l, mask, mode))(np.zeros((2, 200), np.float32)))
        g = grad("seq_mean_token_mean")
        np.testing.assert_allclose(g[0, 0], 1 / 400, rtol=1e-6)
        np.testing.assert_allclose(g[1, 0], 1 / 20, rtol=1e-6)
        g = grad("token_mean")
        np.testing.assert_allclose(g[0, 0], 1 / 210, rtol=1e-6)
        np.testing.assert_allclose(g[1, 0], 1 / 210, rtol=1e-6)
        g = grad("seq_mean_token_sum_norm")
        np.testing.assert_allclose(g[0, 0], g[1, 0], rtol=1e-6)  # Dr. GRPO: no length bias
        np.testing.assert_allclose(g[0, 0], 1 / 400, rtol=1e-6)
        self.assertEqual(g[1, 50], 0.0)  # padding gets no gradient

    @parameterized.parameters(*AGGREGATION_MODES)
    def test_all_masked_is_zero(self, mode):
        self.assertEqual(float(aggregate_loss(np.ones((3, 4)), np.zeros((3, 4)), mode)), 0.0)

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match="mode must be one of"):
            aggregate_loss(np.ones((2, 2)), np.ones((2, 2)), "mean")

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"mask has shape \(2, 2\), expected \(2, 3\) \(the shape of loss_mat\)"):
            aggregate_loss(np.ones((2, 3)), np.ones((2, 2)), "token_mean")
