"""SFT trainer: packed rows give the same loss as unpacked ones; the loss falls."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.data.sft import SFTLoader
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.sft import SFTConfig, batch_arrays, sft_forward_loss, train

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _examples(n=12):
    return [{"prompt": d["prompt"], "response": d["answer"]} for d in make_arithmetic_dataset(n, 0)]


def test_packed_loss_equals_unpacked_loss():
    tok = CharTokenizer()
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    examples = _examples(6)
    plain = SFTLoader(examples, tok, 6, max_len=16, shuffle=False, bucket=None)
    packed = SFTLoader(examples, tok, 1, max_len=64, shuffle=False, pack=True, bucket=None)
    b_plain = batch_arrays(next(plain))
    b_packed = batch_arrays(next(packed))
    assert b_packed["tokens"].shape[0] == 1 and int(b_packed["segment_ids"].max()) == 6  # all six in one row
    assert float(b_packed["loss_mask"].sum()) == float(b_plain["loss_mask"].sum())
    loss_plain, _ = sft_forward_loss(model, b_plain, "token_mean", 64)
    loss_packed, _ = sft_forward_loss(model, b_packed, "token_mean", 64, packed=True)
    np.testing.assert_allclose(float(loss_packed), float(loss_plain), rtol=1e-5)
    loss_leaky, _ = sft_forward_loss(model, b_packed, "token_mean", 64, packed=False)
    assert abs(float(loss_leaky) - float(loss_plain)) > 1e-4  # without segments, examples leak


def test_sft_loss_falls_and_only_responses_count(tmp_path):
    tok = CharTokenizer()
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    config = SFTConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=25, progress=False),
                       optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, pack=True)
    result = train(config, policy=model, tokenizer=tok, examples=_examples(32))
    losses = [row["loss"] for row in result.history]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    # the number of trained tokens is the response tokens (answer + eos) only
    batch = batch_arrays(next(SFTLoader(_examples(4), tok, 4, max_len=16, shuffle=False)))
    expected = sum(len(e["response"]) + 1 for e in _examples(4))
    assert float(jnp.sum(batch["loss_mask"])) == expected


def test_final_export_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tok = CharTokenizer()
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    config = SFTConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False), batch_size=4, max_len=16)
    result = train(config, policy=model, tokenizer=tok, examples=_examples(8))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokens = np.array([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(result.model(jnp.asarray(tokens))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_learning_rate_zero_is_a_frozen_control_run(tmp_path):
    """lr = 0 is allowed (a control experiment): the run logs losses, the weights stay put."""
    import jax

    tok = CharTokenizer()
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    config = SFTConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False, export_hf=False),
                       optim=OptimConfig(learning_rate=0.0, weight_decay=0.1), batch_size=8, max_len=16)
    result = train(config, policy=model, tokenizer=tok, examples=_examples(16))
    assert all(np.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in result.history)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(result.model, nnx.Param)))
