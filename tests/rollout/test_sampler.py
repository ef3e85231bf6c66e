"""generate(): greedy parity with transformers, exact log-probs, stop tokens, groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, load_hf, tiny_config
from jaxrl_llm.ops import token_logprobs
from jaxrl_llm.rollout.filters import FILTER_VALUE, process_logits
from jaxrl_llm.rollout.sampler import apply_stop_strings, decode_windows, generate, left_align
from tests.models.helpers import make_hf_model, padded_batch


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = make_hf_model("llama", seed=3)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    model, _ = load_hf(str(path))
    return hf, model


@pytest.fixture(scope="module")
def tiny_model():
    return CausalLM(tiny_config("llama"), rngs=nnx.Rngs(0))


def teacher_forced_logits(model, rollout):
    """Logits predicting each response token, from one full forward (left-aligned)."""
    tokens, mask = rollout.full_tokens()
    logits, _ = model(tokens, attention_mask=mask)
    p = rollout.prompt_tokens.shape[1]
    return logits[:, p - 1 : -1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_matches_transformers_generate(hf_and_ours, side):
    import torch

    hf, model = hf_and_ours
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3]
    tok_left, mask_left, _ = padded_batch(rng, lengths, 9, "left")
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(tok_left, dtype=torch.long),
            attention_mask=torch.tensor(mask_left, dtype=torch.long),
            max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[:, 9:].numpy()
    if side == "left":
        tokens, mask = tok_left, mask_left
    else:  # the same prompts, right-padded
        order = np.argsort(mask_left == 0, axis=1, kind="stable")
        tokens, mask = np.take_along_axis(tok_left, order, 1), np.take_along_axis(mask_left, order, 1)
    out = generate(model, tokens, mask, max_new_tokens=16, temperature=0.0, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.all(np.asarray(out.lengths) == 16) and not np.any(np.asarray(out.finished))


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.8, min_p=0.02)])
def test_sampled_logprobs_equal_teacher_forced(tiny_model, options):
    rng = np.random.default_rng(1)
    tokens, mask, _ = padded_batch(rng, [4, 7], 7, "right", vocab=64)
    out = generate(tiny_model, tokens, mask, max_new_tokens=10, num_samples=3, rng=jax.random.PRNGKey(2),
                   return_raw_logprobs=True, **options)
    logits = teacher_forced_logits(tiny_model, out)
    m = np.asarray(out.mask)
    raw = np.asarray(token_logprobs(logits, out.tokens))
    np.testing.assert_allclose(raw * m, np.asarray(out.raw_logprobs) * m, atol=2e-5)
    processed = jax.vmap(lambda l: process_logits(l, **options), in_axes=1, out_axes=1)(logits)
    sampled = np.asarray(token_logprobs(processed, out.tokens))
    np.testing.assert_allclose(sampled * m, np.asarray(out.logprobs) * m, atol=2e-5)
    # every sampled token lies in the filtered support
    kept = np.take_along_axis(np.asarray(processed), np.asarray(out.tokens)[..., None], -1)[..., 0]
    assert np.all(kept[m == 1] > 0.5 * FILTER_VALUE)


def test_top_k_support_over_many_draws(tiny_model):
    tokens, mask = np.array([[5, 6, 7]]), np.ones((1, 3), np.int32)
    out = generate(tiny_model, tokens, mask, max_new_tokens=1, num_samples=400, top_k=3, rng=jax.random.PRNGKey(0))
    logits, _ = tiny_model(jnp.asarray(tokens))
    allowed = set(np.argsort(-np.asarray(logits[0, -1]))[:3].tolist())
    drawn = set(np.asarray(out.tokens)[:, 0].tolist())
    assert drawn <= allowed and len(drawn) > 1


def test_stop_tokens_end_responses(tiny_model):
    rng = np.random.default_rng(4)
    tokens, mask, _ = padded_batch(rng, [3, 6, 5, 4], 6, "left", vocab=64)
    free = generate(tiny_model, tokens, mask, max_new_tokens=12, temperature=0.0, rng=jax.random.PRNGKey(0))
    free_tokens = np.asarray(free.tokens)
    stop = int(free_tokens[0, 4])  # a token row 0 produces at step 4
    out = generate(tiny_model, tokens, mask, max_new_tokens=12, temperature=0.0, stop_token_ids=(stop, 63),
                   pad_token_id=0, rng=jax.random.PRNGKey(0))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(4):
        hits = np.where(np.isin(free_tokens[row], [stop, 63]))[0]
        if len(hits):
            end = hits[0] + 1
            assert out.finished[row] and out.lengths[row] == end
            np.testing.assert_array_equal(toks[row, :end], free_tokens[row, :end])
            assert np.all(toks[row, end:] == 0) and np.all(m[row, end:] == 0) and np.all(m[row, :end] == 1)
        else:
            assert not out.finished[row] and out.lengths[row] == 12  # cut at max_new_tokens
            np.testing.assert_array_equal(toks[row], free_tokens[row])
    assert out.finished[0]


def test_rng_determinism_and_group_diversity(tiny_model):
    tokens, mask = np.array([[1, 2, 3, 4]]), np.ones((1, 4), np.int32)
    a = generate(tiny_model, tokens, mask, max_new_tokens=8, num_samples=4, rng=jax.random.PRNGKey(7))
    b = generate(tiny_model, tokens, mask, max_new_tokens=8, num_samples=4, rng=jax.random.PRNGKey(7))
    c = generate(tiny_model, tokens, mask, max_new_tokens=8, num_samples=4, rng=jax.random.PRNGKey(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    rows = {tuple(r) for r in np.asarray(a.tokens).tolist()}
    assert len(rows) > 1  # the G samples of one prompt differ


def test_shared_prefill_equals_repeated_prompts(tiny_model):
    rng = np.random.default_rng(5)
    tokens, mask, _ = padded_batch(rng, [3, 5], 5, "right", vocab=64)
    grouped = generate(tiny_model, tokens, mask, max_new_tokens=6, num_samples=3, temperature=0.0, rng=jax.random.PRNGKey(0))
    repeated = generate(tiny_model, np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0), max_new_tokens=6,
                        temperature=0.0, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(grouped.tokens, repeated.tokens)
    np.testing.assert_array_equal(grouped.prompt_tokens, np.repeat(np.asarray(repeated.prompt_tokens), 1, 0))


def test_stop_strings_after_decoding():
    tok = CharTokenizer()
    model = CausalLM(tiny_config("llama"), rngs=nnx.Rngs(1))
    ids = tok.encode("ab")
    out = generate(model, np.array([ids]), np.ones((1, len(ids)), np.int32), max_new_tokens=10, num_samples=2,
                   rng=jax.random.PRNGKey(0))
    text = tok.decode(np.asarray(out.tokens)[0].tolist())
    stop = text[3:5]  # a two-character stop string inside the first response
    cut = apply_stop_strings(out, tok, [stop])
    kept = tok.decode(np.asarray(cut.tokens)[0, : int(cut.lengths[0])].tolist())
    assert kept.endswith(stop) and stop not in kept[:-1] and bool(cut.finished[0])
    assert np.all(np.asarray(cut.logprobs)[0, int(cut.lengths[0]):] == 0)


def test_left_align():
    tokens = jnp.array([[5, 6, 0, 0], [0, 7, 8, 9]])
    mask = jnp.array([[1, 1, 0, 0], [0, 1, 1, 1]])
    t, m = left_align(tokens, mask)
    np.testing.assert_array_equal(t, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(m, [[0, 0, 1, 1], [0, 1, 1, 1]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, num_samples=0), "num_samples"),
        (dict(max_new_tokens=4, decode_window=0), "decode_window"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, np.ones((1, 3), np.int32), np.ones((1, 3), np.int32), rng=jax.random.PRNGKey(0), **kwargs)


def test_bad_prompt_shapes(tiny_model):
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(tiny_model, np.ones((2, 3), np.int32), np.ones((2, 4), np.int32), max_new_tokens=2, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny_model, np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]]), max_new_tokens=2, rng=jax.random.PRNGKey(0))


def test_decode_windows_double_up_to_the_budget():
    assert decode_windows(128, 64) == (128,)  # ≤ 2 windows' worth: one compiled loop
    assert decode_windows(256, 64) == (64, 128, 256)
    assert decode_windows(300, 64) == (64, 128, 256, 300)
    assert decode_windows(9, 2) == (2, 4, 8, 9)


@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9)])
def test_growing_cache_windows_give_the_single_window_result(tiny_model, options):
    """Decoding through 4 cache windows (2, 4, 8, 13 new tokens) equals one static cache:
    the same tokens, log-probs, masks and stops, with left- and right-padded prompts."""
    rng = np.random.default_rng(3)
    for side in ("left", "right"):
        tokens, mask, _ = padded_batch(rng, [3, 6, 5], 6, side, vocab=64)
        kwargs = dict(max_new_tokens=13, num_samples=2, rng=jax.random.PRNGKey(4), return_raw_logprobs=True,
                      stop_token_ids=(7,), **options)
        one = generate(tiny_model, tokens, mask, decode_window=100, **kwargs)
        grown = generate(tiny_model, tokens, mask, decode_window=2, **kwargs)
        np.testing.assert_array_equal(np.asarray(grown.tokens), np.asarray(one.tokens))
        np.testing.assert_array_equal(np.asarray(grown.mask), np.asarray(one.mask))
        np.testing.assert_array_equal(np.asarray(grown.finished), np.asarray(one.finished))
        np.testing.assert_allclose(np.asarray(grown.logprobs), np.asarray(one.logprobs), atol=1e-5)
        np.testing.assert_allclose(np.asarray(grown.raw_logprobs), np.asarray(one.raw_logprobs), atol=1e-5)
