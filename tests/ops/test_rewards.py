"""overlong_penalty (DAPO eq. 13) and sequence log-prob reduction."""

import functools

import chex
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrl_llm.ops import overlong_penalty, sequence_logprobs, sft_loss
from tests.ops.helpers import float32, ragged_mask


def ref_overlong(length, max_len, buffer_len, factor):
    expected = max_len - buffer_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / buffer_len * factor
    return -factor


class OverlongTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((20, 4, 1.0), (16, 16, 0.5), (100, 30, 2.0))
    def test_matches_piecewise_definition(self, max_len, buffer_len, factor):
        lengths = np.arange(0, max_len + 10)
        out = self.variant(functools.partial(overlong_penalty, max_len=max_len, buffer_len=buffer_len, factor=factor))(lengths)
        expected = [ref_overlong(int(n), max_len, buffer_len, factor) for n in lengths]
        chex.assert_trees_all_close(out, np.array(expected), rtol=1e-6, atol=1e-7)

    def test_dapo_worked_example(self):
        # L_max = 20480, L_cache = 4096 (DAPO): 16384 → 0, 18432 → −0.5, 20480 → −1, 30000 → −1
        out = overlong_penalty(np.array([16384, 18432, 20480, 30000]), 20480, 4096)
        np.testing.assert_allclose(out, [0.0, -0.5, -1.0, -1.0])

    def test_bad_buffer(self):
        with pytest.raises(ValueError, match="buffer_len"):
            overlong_penalty(np.array([1]), 10, 0)
        with pytest.raises(ValueError, match="buffer_len"):
            overlong_penalty(np.array([1]), 10, 11)


class SequenceLogprobsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_matches_loop(self, normalize):
        rng = np.random.default_rng(0)
        logp, mask = float32(rng, 5, 7), ragged_mask(rng, 5, 7, min_len=1, holes=True)
        mask[:, 0] = 1.0
        out = self.variant(functools.partial(sequence_logprobs, length_normalize=normalize))(logp, mask)
        for b in range(5):
            sel = [logp[b, t] for t in range(7) if mask[b, t]]
            np.testing.assert_allclose(out[b], np.mean(sel) if normalize else np.sum(sel), rtol=1e-5)


class SFTLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_token_mean_nll(self):
        rng = np.random.default_rng(1)
        logp, mask = -np.abs(float32(rng, 4, 6)), ragged_mask(rng, 4, 6, min_len=1)
        loss, metrics = self.variant(sft_loss)(logp, mask)
        sel = [-logp[b, t] for b in range(4) for t in range(6) if mask[b, t]]
        chex.assert_trees_all_close(loss, np.mean(sel), rtol=1e-5)
        chex.assert_trees_all_close(metrics["perplexity"], np.exp(np.mean(sel)), rtol=1e-5)
        chex.assert_trees_all_close(metrics["num_tokens"], float(len(sel)))
