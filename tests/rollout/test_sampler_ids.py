"""generate() and response_logprobs(): token ids outside [0, vocab_size) are errors naming
the argument, the value and the model's vocab_size; traced ids (under jit) are not read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, tiny_config
from jaxrl_llm.ops import logprobs_from_hidden
from jaxrl_llm.ops.checks import check_token_ids
from jaxrl_llm.rollout.sampler import check_ids_fit, generate
from jaxrl_llm.train.policy import response_logprobs

VOCAB = 200
KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def model():
    config = tiny_config("llama", vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return CausalLM(config, rngs=nnx.Rngs(0))


def _gen(model, prompts, mask=None, **kw):
    prompts = np.asarray(prompts)
    mask = np.ones(prompts.shape, np.int32) if mask is None else mask
    return generate(model, prompts, mask, rng=KEY, **{"max_new_tokens": 2, **kw})


@pytest.mark.parametrize(
    "prompts, mask, match",
    [
        ([[1, 250, 3]], None, r"prompts holds token id\(s\) 250 outside \[0, 200\) \(1 such, first at row 0, column 1\): the model's vocab_size is 200"),
        ([[1, 2, 3], [200, 200, 7]], None, r"prompts holds token id\(s\) 200 outside \[0, 200\) \(2 such, first at row 1, column 0\)"),
        ([[-5, 2, 3]], None, r"prompts holds token id\(s\) -5 outside \[0, 200\)"),
        ([[1, 2, 300]], [[1, 1, 0]], r"prompts holds token id\(s\) 300 .*\(a padding position: padding is embedded too"),
        ([[1, 2, -100]], [[1, 1, 0]], r"prompts holds token id\(s\) -100 .*padding position"),
        (jnp.asarray([[1, 2, 9999]], jnp.int32), None, r"prompts holds token id\(s\) 9999 outside \[0, 200\)"),
    ],
    ids=["above", "at-vocab", "negative", "padding-above", "padding-ignore-index", "jax-array"],
)
def test_generate_rejects_prompt_ids_outside_the_vocabulary(model, prompts, mask, match):
    with pytest.raises(ValueError, match=match):
        _gen(model, prompts, None if mask is None else np.asarray(mask))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pad_token_id=200), r"pad_token_id=200 is outside the vocabulary \[0, 200\): the model's vocab_size is 200"),
        (dict(pad_token_id=-1), r"pad_token_id=-1 is outside the vocabulary \[0, 200\)"),
        (dict(pad_token_id=np.int64(256)), r"pad_token_id=256 is outside"),
        (dict(pad_token_id=1.0), r"pad_token_id must hold int token ids, got 1.0"),
        (dict(pad_token_id=True), r"pad_token_id must hold int token ids, got True"),
        (dict(stop_token_ids=(5, 258)), r"stop_token_ids \[5, 258\] hold \[258\], outside the vocabulary \[0, 200\): the model's vocab_size is 200"),
        (dict(stop_token_ids=(-1,)), r"stop_token_ids \[-1\] hold \[-1\]"),
        (dict(stop_token_ids=(5.0,)), r"stop_token_ids must hold int token ids, got 5.0"),
    ],
    ids=["pad-at-vocab", "pad-negative", "pad-numpy-int", "pad-float", "pad-bool", "stop-above", "stop-negative", "stop-float"],
)
def test_generate_rejects_special_ids_outside_the_vocabulary(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gen(model, [[1, 2, 3]], **kwargs)


def test_generate_accepts_the_last_id_of_the_vocabulary(model):
    last = VOCAB - 1
    out = _gen(model, [[last, 1, last]], np.array([[1, 1, 0]]), pad_token_id=last, stop_token_ids=(last, np.int32(0)))
    assert out.tokens.shape == (1, 2)
    assert int(jnp.max(out.tokens)) < VOCAB


def test_models_without_a_vocab_size_are_not_checked(model):
    class NoConfig:
        pass

    check_ids_fit(NoConfig(), np.array([[10**6]]), pad_token_id=10**6, stop_token_ids=(10**6,))


def test_check_token_ids_skips_tracers():
    @jax.jit
    def f(tokens):
        check_token_ids(5, tokens=tokens)  # traced: nothing to read, no error
        return tokens + 1

    np.testing.assert_array_equal(f(jnp.array([10, 11])), [11, 12])
    with pytest.raises(ValueError, match=r"tokens holds token id\(s\) 10, 11 outside \[0, 5\)"):
        check_token_ids(5, tokens=jnp.array([10, 11]))
    with pytest.raises(ValueError, match="must hold integer token ids, got dtype float32"):
        check_token_ids(5, tokens=np.array([1.0], np.float32))
    check_token_ids(None, tokens=np.array([10**9]))  # unknown vocabulary: nothing checked


def _batch(seed=0, n=3, p=3, t=4):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (n, p + t)).astype(np.int32)
    mask = np.ones((n, p + t), np.int32)
    mask[1, p + 2 :] = 0  # a response that stopped early
    mask[2, p:] = 0  # an empty response
    mask[0, 0] = 0  # left padding of a prompt
    return tokens, mask, p


def test_response_logprobs_checks_concrete_ids_and_accepts_traced_ones(model):
    tokens, mask, p = _batch()
    bad = tokens.copy()
    bad[1, 4] = VOCAB + 7
    with pytest.raises(ValueError, match=r"tokens holds token id\(s\) 207 outside \[0, 200\) \(1 such, first at row 1, column 4\): the model's vocab_size is 200"):
        response_logprobs(model, bad, mask, p)
    jitted = jax.jit(lambda tok, m: response_logprobs(model, tok, m, p).logprobs)
    assert jitted(tokens, mask).shape == (3, 4)


def test_response_logprobs_are_zero_at_masked_positions_and_unchanged_elsewhere(model):
    tokens, mask, p = _batch()
    out = response_logprobs(model, tokens, mask, p)
    hidden = model.forward(tokens, attention_mask=mask, return_hidden=True).hidden[:, p - 1 : -1]
    plain_logp, plain_ent = logprobs_from_hidden(hidden, model.unembed, tokens[:, p:])
    valid = mask[:, p:] > 0
    np.testing.assert_array_equal(np.asarray(out.logprobs)[valid], np.asarray(plain_logp)[valid])
    np.testing.assert_array_equal(np.asarray(out.entropy)[valid], np.asarray(plain_ent)[valid])
    assert np.all(np.asarray(out.logprobs)[~valid] == 0) and np.all(np.asarray(out.entropy)[~valid] == 0)
