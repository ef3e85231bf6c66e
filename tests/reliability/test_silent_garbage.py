"""Inputs that used to give silent garbage instead of an error or a finite update.

1. Ids outside the vocabulary: a prompt id, pad id or stop id past the model's embedding
   table, or a tokenizer bigger than the model's vocabulary, is not an error in JAX (a
   gather clamps, or fills with NaN, and one NaN embedding of a padded row reaches every
   real row through attention). Each is now a ValueError naming the argument, the value
   and the model's vocab_size — one registry of cases, ``test_bad_input_silent_garbage``,
   counted together with tests/reliability/test_bad_inputs.py by
       pytest --collect-only -q tests/reliability/test_bad_inputs.py \\
           tests/reliability/test_silent_garbage.py | grep -c "::test_bad_input"
2. NaN / ±inf at masked positions of a training batch (padding log-probs, advantages of
   unscored samples, ...): the loss, the metrics and the parameter gradients stay finite
   and equal to those of the same batch with zeros there.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.models import CausalLM, tiny_config
from jaxrl_llm.models.tokenizer import CharTokenizer
from jaxrl_llm.rollout.sampler import generate
from jaxrl_llm.train.policy import check_tokenizer_fits, response_logprobs, split_model
from tests.data.conftest import make_hf_tokenizer

SMALL = tiny_config("llama", vocab_size=200, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                    max_position_embeddings=64)
MODEL = CausalLM(SMALL, rngs=nnx.Rngs(0))
KEY = jax.random.PRNGKey(0)
TOK = np.ones((2, 3), np.int32)


class _Tokenizer:
    """Just what check_tokenizer_fits reads: len() and the special ids."""

    def __init__(self, size, **ids):
        self.size = size
        self.bos_token_id = self.eos_token_id = self.pad_token_id = None
        self.__dict__.update(ids)

    def __len__(self):
        return self.size


def _gen(prompts=TOK, mask=TOK, **kw):
    return lambda: generate(MODEL, np.asarray(prompts), np.asarray(mask), rng=KEY, **{"max_new_tokens": 2, **kw})


def _hf_with_added_tokens(n):
    tok = make_hf_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(n)])
    return tok


# (case id, call, exception type, regex the message must match)
CASES = [
    # ---- ids past the embedding table
    ("generate-prompt-id-above-vocab", _gen(prompts=[[1, 2, 3], [4, 250, 6]]), ValueError,
     r"prompts holds token id\(s\) 250 outside \[0, 200\) \(1 such, first at row 1, column 1\): the model's vocab_size is 200"),
    ("generate-prompt-id-negative", _gen(prompts=[[1, -100, 3], [4, 5, 6]]), ValueError,
     r"prompts holds token id\(s\) -100 outside \[0, 200\).*vocab_size is 200"),
    ("generate-padding-id-above-vocab", _gen(prompts=[[1, 2, 258], [4, 5, 6]], mask=[[1, 1, 0], [1, 1, 1]]), ValueError,
     r"prompts holds token id\(s\) 258 .*\(a padding position: padding is embedded too"),
    ("generate-pad_token_id-above-vocab", _gen(pad_token_id=256), ValueError,
     r"pad_token_id=256 is outside the vocabulary \[0, 200\): the model's vocab_size is 200"),
    ("generate-pad_token_id-float", _gen(pad_token_id=0.5), ValueError, r"pad_token_id must hold int token ids, got 0.5"),
    ("generate-stop_token_id-above-vocab", _gen(stop_token_ids=(3, 258)), ValueError,
     r"stop_token_ids \[3, 258\] hold \[258\], outside the vocabulary \[0, 200\): the model's vocab_size is 200"),
    ("response_logprobs-token-id-above-vocab", lambda: response_logprobs(MODEL, np.array([[1, 2, 3, 201]]), np.ones((1, 4)), 2),
     ValueError, r"tokens holds token id\(s\) 201 outside \[0, 200\) \(1 such, first at row 0, column 3\): the model's vocab_size is 200"),
    ("model-forward-token-id-above-vocab", lambda: MODEL(np.array([[1, 2, 3], [4, 5, 230]])), ValueError,
     r"tokens holds token id\(s\) 230 outside \[0, 200\) \(1 such, first at row 1, column 2\): the model's vocab_size is 200"),
    ("model-forward-padding-id-negative", lambda: MODEL(np.array([[-1, 2, 3]]), attention_mask=np.array([[0, 1, 1]])),
     ValueError, r"tokens holds token id\(s\) -1 .*\(a padding position: padding is embedded too"),
    # ---- a tokenizer that does not belong to the model
    ("tokenizer-gpt2-vs-32000", lambda: check_tokenizer_fits(tiny_config("llama", vocab_size=32000), _Tokenizer(50257, eos_token_id=50256)),
     ValueError, r"tokenizer has 50257 tokens \(eos_token_id=50256\) but the model's vocab_size is 32000: they do not belong together"),
    ("tokenizer-char-vs-small-model", lambda: check_tokenizer_fits(MODEL, CharTokenizer()), ValueError,
     r"tokenizer has 259 tokens \(bos_token_id=257, eos_token_id=258, pad_token_id=256\) but the model's vocab_size is 200"),
    ("tokenizer-hf-added-tokens-vs-model", lambda: check_tokenizer_fits(tiny_config("llama"), _hf_with_added_tokens(5)), ValueError,
     r"tokenizer has 264 tokens but the model's vocab_size is 259: they do not belong together"),
    ("tokenizer-special-id-past-vocab", lambda: check_tokenizer_fits(tiny_config("llama"), _Tokenizer(100, eos_token_id=300)), ValueError,
     r"tokenizer has 100 tokens \(eos_token_id=300\) but the model's vocab_size is 259"),
    ("tokenizer-eos-list-past-vocab", lambda: check_tokenizer_fits(tiny_config("llama"), _Tokenizer(100, eos_token_id=[5, 400])), ValueError,
     r"\(eos_token_id\[1\]=400\) but the model's vocab_size is 259"),
    # ---- masked reductions check their masks like the losses do
    ("ops.masked_mean-mask-nonbinary", lambda: ops.masked_mean(np.zeros((2, 3)), np.full((2, 3), 0.5)), ValueError,
     r"mask must hold only 0 and 1.*found \[0.5\]"),
    ("ops.masked_sum-mask-nan", lambda: ops.masked_sum(np.zeros((2, 3)), np.full((2, 3), np.nan)), ValueError,
     r"mask must hold only 0 and 1.*found \[nan\]"),
    ("ops.masked_whiten-mask-complex", lambda: ops.masked_whiten(np.zeros((2, 3)), np.ones((2, 3), np.complex64)), ValueError,
     r"mask must be a bool, int or float mask of 0/1, got dtype complex64"),
    ("ops.masked_var-mask-shape", lambda: ops.masked_var(np.zeros((2, 3)), np.ones((3, 2))), ValueError,
     r"mask of shape \(3, 2\) does not broadcast to x of shape \(2, 3\)"),
    ("ops.kl_penalty-mask-nonbinary", lambda: ops.kl_penalty(np.zeros((2, 3)), np.zeros((2, 3)), mask=np.full((2, 3), 2)), ValueError,
     r"mask must hold only 0 and 1.*found \[2\]"),
    ("ops.group_advantages-mask-shape", lambda: ops.group_advantages(np.zeros(4), 2, mask=np.ones(6)), ValueError,
     r"mask has shape \(6,\), expected \(4,\)"),
]


@pytest.mark.parametrize("case, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_silent_garbage(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_tokenizer_smaller_than_the_model_is_fine():
    """Padded embedding tables (vocab rounded up to 64 / 128) are normal."""
    check_tokenizer_fits(tiny_config("llama"), CharTokenizer())  # equal sizes
    check_tokenizer_fits(tiny_config("llama", vocab_size=320), CharTokenizer())
    check_tokenizer_fits(tiny_config("llama", vocab_size=320), CharTokenizer().to_hf())
    check_tokenizer_fits(tiny_config("llama", vocab_size=320), make_hf_tokenizer(specials=False))
    check_tokenizer_fits(CausalLM(tiny_config("llama"), rngs=nnx.Rngs(0)), CharTokenizer())


def test_padding_ids_are_checked_too():
    """Padding is embedded like any token: an id past the table there is filled with NaN
    by the gather (jnp.take's default), which attention can carry from the masked key into
    real rows, so generate rejects it like a real prompt id; a valid padding id is fine."""
    model = CausalLM(tiny_config("llama"), rngs=nnx.Rngs(0))
    mask = np.array([[0, 1, 1]], np.int32)
    out = generate(model, np.array([[258, 5, 6]]), mask, max_new_tokens=1, rng=KEY)
    assert np.all(np.isfinite(np.asarray(out.logprobs)))
    with pytest.raises(ValueError, match=r"prompts holds token id\(s\) 300 .*padding position.*vocab_size is 259"):
        generate(model, np.array([[300, 5, 6]]), mask, max_new_tokens=1, rng=KEY)


# ---------------------------------------------------------------- NaN at masked positions


def _rollout_batch(seed=0, n=4, p=3, t=5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 259, (n, p + t)).astype(np.int32)
    full_mask = np.ones((n, p + t), np.int32)
    full_mask[0, 0] = 0  # left-padded prompt
    full_mask[1, p + 3 :] = 0  # stopped early
    full_mask[2, p + 1 :] = 0
    full_mask[3, p:] = 0  # an unscored sample, all masked
    mask = full_mask[:, p:].astype(np.float32)
    batch = {
        "old_logp": (rng.standard_normal((n, t)) * 0.1 - 5.0).astype(np.float32),
        "ref_logp": (rng.standard_normal((n, t)) * 0.1 - 5.0).astype(np.float32),
        "advantages": rng.standard_normal(n).astype(np.float32),
        "old_values": rng.standard_normal((n, t)).astype(np.float32),
        "returns": rng.standard_normal((n, t)).astype(np.float32),
    }
    return tokens, full_mask, mask, p, batch


def _poison(batch, mask, value):
    masked = mask == 0
    empty_rows = masked.all(axis=-1)
    out = {}
    for k, x in batch.items():
        bad = empty_rows if x.ndim == 1 else masked
        out[k] = np.where(bad, np.float32(value), x).astype(np.float32)
    return out


def _loss(params, split, tokens, full_mask, mask, p, batch, kl_kind, agg):
    model = split.merge(params)
    out = response_logprobs(model, tokens, full_mask, p, chunk_size=7)
    pg, pg_metrics = ops.ppo_policy_loss(out.logprobs, batch["old_logp"], batch["advantages"], mask,
                                         dual_clip=3.0, agg=agg)
    # the critic's values: here a function of the policy's log-probs (any differentiable [N, T])
    vf, vf_metrics = ops.value_loss(out.logprobs * 0.1, batch["old_values"], batch["returns"], mask, agg=agg)
    kl = ops.kl_penalty(out.logprobs, batch["ref_logp"], kl_kind, mask=mask)
    loss = (pg + 0.5 * vf + 0.1 * ops.aggregate_loss(kl, mask, agg)
            - 0.01 * ops.aggregate_loss(out.entropy, mask, agg))
    return loss, {**pg_metrics, **vf_metrics, "entropy": ops.masked_mean(out.entropy, mask)}


@pytest.mark.parametrize("kl_kind, agg", [("k3", "token_mean"), ("k2", "seq_mean_token_sum_norm"), ("k1", "seq_mean_token_mean")])
def test_nan_and_inf_at_masked_positions_of_a_batch_leave_the_update_finite(kl_kind, agg):
    model = CausalLM(tiny_config("llama"), rngs=nnx.Rngs(1))
    split = split_model(model)
    tokens, full_mask, mask, p, batch = _rollout_batch()
    grad_fn = jax.jit(jax.value_and_grad(
        lambda params, b: _loss(params, split, tokens, full_mask, mask, p, b, kl_kind, agg), has_aux=True))

    def run(b):
        (loss, metrics), grads = grad_fn(split.params, b)
        return loss, metrics, grads

    want = run(_poison(batch, mask, 0.0))
    leaves = jax.tree.leaves(want)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    for value in (np.nan, np.inf, -np.inf):
        got = run(_poison(batch, mask, value))
        for g, w in zip(jax.tree.leaves(got), leaves):
            g = np.asarray(g)
            assert np.all(np.isfinite(g)), f"{value} at masked positions: a non-finite loss, metric or gradient"
            np.testing.assert_array_equal(g, np.asarray(w))


def test_gae_and_whitening_ignore_poisoned_padding():
    """PPO's targets: KL-shaped rewards → GAE → whitening, with NaN in the padding of
    every input, equal the targets computed with zeros there."""
    _, _, mask, _, batch = _rollout_batch(seed=3)
    rng = np.random.default_rng(4)
    logp = (rng.standard_normal(mask.shape) - 5).astype(np.float32)
    values = rng.standard_normal(mask.shape).astype(np.float32)
    scores = rng.standard_normal(mask.shape[0]).astype(np.float32)

    def targets(logp, ref_logp, values, scores):
        kl = ops.kl_penalty(logp, ref_logp, "k1", mask=mask)
        rewards = ops.shape_token_rewards(scores, kl, mask, 0.05)
        adv, ret = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95)
        return ops.masked_whiten(adv, mask), ret

    masked, empty = mask == 0, ~mask.any(axis=-1)
    want = targets(np.where(masked, 0, logp), np.where(masked, 0, batch["ref_logp"]), np.where(masked, 0, values),
                   np.where(empty, 0, scores))
    got = targets(np.where(masked, np.nan, logp), np.where(masked, -np.inf, batch["ref_logp"]),
                  np.where(masked, np.inf, values), np.where(empty, np.nan, scores))
    for g, w in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_check_tokenizer_fits_reads_a_checkpoint_config_without_loading(tmp_path):
    """A local HF checkpoint path is checked from its config.json (vocab 128 here), and
    optional models (None) are skipped, so trainers can pass their arguments as given."""
    from tests.models.helpers import make_hf_model

    make_hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer has 259 tokens \(bos_token_id=257, eos_token_id=258, "
                                         r"pad_token_id=256\) but the model's vocab_size is 128"):
        check_tokenizer_fits(str(tmp_path), CharTokenizer())
    check_tokenizer_fits(str(tmp_path), _Tokenizer(100, eos_token_id=99))
    check_tokenizer_fits(None, CharTokenizer())
