"""Value / reward heads: last-valid-token pooling, mean pooling, and parity with
transformers' *ForSequenceClassification (num_labels=1)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxrl_llm.models import (
    RewardModel,
    ScalarHeadModel,
    ValueModel,
    last_valid_index,
    load_hf,
    pool_values,
    save_hf,
)
from tests.models.helpers import VOCAB as V
from tests.models.helpers import make_hf_model, padded_batch, scale_params, small_config

PAD = 0
_cfg = small_config


def test_last_valid_index_and_pooling():
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(last_valid_index(mask), [2, 3, 0, 0])
    values = jnp.arange(16, dtype=jnp.float32).reshape(4, 4)
    np.testing.assert_allclose(pool_values(values, mask, "last"), [2, 7, 8, 12])
    np.testing.assert_allclose(pool_values(values, mask, "mean"), [1, 6, 0, 12])
    with pytest.raises(ValueError, match="pool"):
        pool_values(values, mask, "max")


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_reads_last_valid_token_only(side):
    model = scale_params(RewardModel(_cfg(), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens, mask, _ = padded_batch(rng, (12, 7, 3), 12, side)
    score = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert score.shape == (3,)
    # changing padding tokens does not change the score,
    noisy = np.where(mask == 1, tokens, rng.integers(1, V, tokens.shape))
    np.testing.assert_allclose(
        model(jnp.asarray(noisy), attention_mask=jnp.asarray(mask)), score, atol=1e-5
    )
    # changing the last valid token does.
    last = np.asarray(last_valid_index(jnp.asarray(mask)))
    edited = tokens.copy()
    edited[np.arange(3), last] = (edited[np.arange(3), last] + 1) % V
    moved = model(jnp.asarray(edited), attention_mask=jnp.asarray(mask))
    assert np.all(np.abs(np.asarray(moved - score)) > 1e-6)


def test_value_and_mean_pool_heads():
    cfg = _cfg()
    value = scale_params(ValueModel(cfg, rngs=nnx.Rngs(0)))
    mean = scale_params(ScalarHeadModel(cfg, rngs=nnx.Rngs(0), pool="mean"))
    tokens, mask, _ = padded_batch(np.random.default_rng(1), (12, 7, 3), 12, "right")
    v = value(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    m = mean(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert v.shape == (3, 12) and v.dtype == jnp.float32
    np.testing.assert_allclose(m, [v[0].mean(), v[1, :7].mean(), v[2, :3].mean()], rtol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        ScalarHeadModel(cfg, rngs=nnx.Rngs(0), pool="max")


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_sequence_classification_checkpoint_matches_transformers(family, tmp_path):
    hf = make_hf_model(family, head="seq_cls", num_labels=1, pad_token_id=PAD)
    hf.save_pretrained(tmp_path / "hf")
    model, config = load_hf(str(tmp_path / "hf"), kind="reward")
    tokens, mask, _ = padded_batch(np.random.default_rng(2), (12, 7, 3), 12, "right")
    with torch.no_grad():
        want = (
            hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
            .logits[:, 0]
            .numpy()
        )
    got = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, want, atol=1e-4)

    # round trip: save_hf writes a *ForSequenceClassification checkpoint.
    from transformers import AutoModelForSequenceClassification

    save_hf(model, str(tmp_path / "ours"))
    again = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
    again.config.pad_token_id = PAD
    with torch.no_grad():
        back = again(input_ids=torch.tensor(tokens, dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(back, want, atol=1e-4)


def test_value_head_from_causal_lm_checkpoint(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    value, _ = load_hf(str(tmp_path), kind="value")
    causal, _ = load_hf(str(tmp_path))
    assert value.pool == "none"
    chex.assert_trees_all_equal(nnx.state(value.model), nnx.state(causal.model))
    out = value(jnp.ones((3, 12), jnp.int32))
    assert out.shape == (3, 12) and bool(jnp.all(jnp.isfinite(out)))
