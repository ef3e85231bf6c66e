"""Training a decoder stored stacked (`scan_layers=True`, `stack_layers`): the trainers
see only a parameter tree, so a stacked model trains as the unrolled one does (same
losses and, per layer, the same weights), LoRA gets one adapter pair per layer, and the
memory estimator counts the same bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.models.layer_stacking import is_stacked, per_layer_state, stack_layers
from jaxrl_llm.parallel import estimate_memory
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train import grpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, init_lora
from jaxrl_llm.train.optim import OptimConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
TOL = dict(rtol=1e-4, atol=1e-5)
# weights after a few AdamW steps at lr 1e-2: Adam divides by sqrt(v), so a float32-level
# gradient difference (scan vs unrolled summation order) on a near-zero gradient moves a
# weight by up to ~1e-4 (1 % of one step), while every step moves the weights by ~1e-2
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-4)


def _config():
    return tiny_config("llama", **TINY)


def _pair():
    unrolled = CausalLM(_config(), rngs=nnx.Rngs(0))
    return unrolled, stack_layers(unrolled)


def _assert_same_weights(stacked_model, unrolled_model):
    assert is_stacked(stacked_model) and not is_stacked(unrolled_model)
    got = jax.tree.leaves(per_layer_state(stacked_model))
    want = jax.tree.leaves(nnx.state(unrolled_model, nnx.Param))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **WEIGHT_TOL)


def test_sft_trains_a_stacked_model_as_the_unrolled_one(tmp_path):
    tok = CharTokenizer()
    examples = [{"prompt": d["prompt"], "response": d["answer"]} for d in make_arithmetic_dataset(32, 0, max_operand=9)]
    results = {}
    for name, model in zip(("unrolled", "stacked"), _pair()):
        config = sft.SFTConfig(run=RunConfig(output_dir=str(tmp_path / name), total_steps=4, progress=False),
                               optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16)
        results[name] = sft.train(config, policy=model, tokenizer=tok, examples=examples)
    losses = {name: [row["loss"] for row in r.history] for name, r in results.items()}
    np.testing.assert_allclose(losses["stacked"], losses["unrolled"], **TOL)
    assert losses["unrolled"][-1] < losses["unrolled"][0]  # it trained: the weights moved
    _assert_same_weights(results["stacked"].model, results["unrolled"].model)


def test_grpo_trains_a_stacked_model_as_the_unrolled_one(tmp_path):
    """Sampling (prefill + decode through the scanned KV cache), log-probs and the
    update: the same samples, metrics and weights after two steps."""
    tok = CharTokenizer()
    data = make_arithmetic_dataset(16, 0, max_operand=9)
    results = {}
    for name, model in zip(("unrolled", "stacked"), _pair()):
        config = grpo.GRPOConfig.preset(
            "grpo", run=RunConfig(output_dir=str(tmp_path / name), total_steps=2, progress=False),
            optim=OptimConfig(learning_rate=1e-2), prompts_per_step=2, group_size=4, max_prompt_len=8,
            max_new_tokens=6, num_inner_updates=2)
        results[name] = grpo.train(config, policy=model, tokenizer=tok, prompts=data,
                                   reward_fn=lambda p, c, **k: [float(len(x) % 3) for x in c])
    for key in ("loss", "reward_mean", "response_length_mean", "grad_norm"):
        got = [row[key] for row in results["stacked"].history]
        want = [row[key] for row in results["unrolled"].history]
        np.testing.assert_allclose(got, want, **TOL, err_msg=key)
    assert any(row["reward_std"] > 0 for row in results["unrolled"].history)  # a gradient flowed
    _assert_same_weights(results["stacked"].model, results["unrolled"].model)


def test_lora_on_a_stacked_model_is_one_adapter_pair_per_layer():
    unrolled, stacked = _pair()
    config = LoRAConfig(rank=3, alpha=6.0, targets=("q_proj", "o_proj", "down_proj"))
    params = nnx.state(stacked, nnx.Param)
    adapters = init_lora(params, config, jax.random.PRNGKey(0))
    n = TINY["num_layers"]
    q = adapters["model_stacks_0_attn_q_proj_value"]
    assert q["a"].shape == (n, 32, 3) and q["b"].shape == (n, 3, 4 * 8)
    assert adapters["model_stacks_0_attn_o_proj_value"]["a"].shape == (n, 4 * 8, 3)  # [H, Hd] in
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    merged = per_layer_state(nnx.merge(nnx.graphdef(stacked), apply_lora(params, adapters, config)))
    base = nnx.state(unrolled, nnx.Param)
    for i in range(n):
        for module, name in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "down_proj")):
            w = np.asarray(base["model"]["layers"][i][module][name][...])
            pair = adapters[f"model_stacks_0_{module}_{name}_value"]
            a, b = np.asarray(pair["a"][i]), np.asarray(pair["b"][i])
            want = w + (a @ b).reshape(w.shape) * 2.0  # alpha / rank
            np.testing.assert_allclose(merged["model"]["layers"][i][module][name][...], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(merged["model"]["layers"][i]["mlp"]["up_proj"][...],
                                      base["model"]["layers"][i]["mlp"]["up_proj"][...])


def test_lora_sft_on_a_stacked_model_trains_only_the_adapters(tmp_path):
    tok = CharTokenizer()
    _, model = _pair()
    base = per_layer_state(model)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "up_proj"))
    config = sft.SFTConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=12, progress=False),
                           optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, lora=lora)
    examples = [{"prompt": d["prompt"], "response": d["answer"]} for d in make_arithmetic_dataset(32, 0, max_operand=9)]
    result = sft.train(config, policy=model, tokenizer=tok, examples=examples)
    losses = [row["loss"] for row in result.history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert is_stacked(result.model)
    tuned = per_layer_state(result.model)
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(tuned), strict=True):
        name = jax.tree_util.keystr(path)
        changed = not np.array_equal(np.asarray(before), np.asarray(after))
        assert changed == any(t in name for t in lora.targets), name


@pytest.mark.parametrize("mesh, remat", [((1, 1, 1), False), ({"fsdp": 4}, False), ({"fsdp": 4}, True),
                                         ((1, 2, 2), True)])
def test_memory_estimate_is_the_same_for_a_stacked_model(mesh, remat):
    """Same parameter, gradient and AdamW bytes; FSDP with remat gathers one layer at a
    time in both layouts (the stack's per-layer slice)."""
    cfg = tiny_config("llama", vocab_size=264, num_layers=4)
    kw = dict(batch=16, seq_len=64, remat=remat)
    unrolled = estimate_memory(cfg, mesh, **kw)
    stacked = estimate_memory(cfg, mesh, **kw, model_factory=lambda: CausalLM(
        cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, scan_layers=True))
    assert stacked == unrolled
    assert (stacked["gathered_params"] > 0) == (mesh != (1, 1, 1))  # the FSDP term is exercised


def test_ppo_trains_a_stacked_model_as_the_unrolled_one(tmp_path):
    """The critic is built from the policy in the policy's layout (its state drops in)."""
    from jaxrl_llm.train import ppo

    tok = CharTokenizer()
    data = make_arithmetic_dataset(16, 0, max_operand=9)
    results = {}
    for name, model in zip(("unrolled", "stacked"), _pair()):
        config = ppo.PPOConfig(run=RunConfig(output_dir=str(tmp_path / name), total_steps=2, progress=False),
                               optim=OptimConfig(learning_rate=1e-2), prompts_per_step=2, max_prompt_len=8,
                               max_new_tokens=4, ppo_epochs=2)
        results[name] = ppo.train(config, policy=model, tokenizer=tok, prompts=data,
                                  reward_fn=lambda p, c, **k: [float(len(x)) for x in c])
    for key in ("pg_loss", "vf_loss", "loss", "critic_grad_norm", "kl"):
        got = [row[key] for row in results["stacked"].history]
        want = [row[key] for row in results["unrolled"].history]
        np.testing.assert_allclose(got, want, **TOL, err_msg=key)
    _assert_same_weights(results["stacked"].model, results["unrolled"].model)


def test_reward_model_from_a_stacked_causal_lm_keeps_the_layout():
    from jaxrl_llm.train.reward_model import as_reward_model

    unrolled, stacked = _pair()
    rm_unrolled, rm_stacked = as_reward_model(unrolled), as_reward_model(stacked)
    assert is_stacked(rm_stacked) and not is_stacked(rm_unrolled)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 200, (2, 7)), jnp.int32)
    np.testing.assert_allclose(rm_stacked.forward(tokens).scores, rm_unrolled.forward(tokens).scores, **TOL)


def test_resuming_in_the_other_layout_says_so(tmp_path):
    from jaxrl_llm.train.checkpoint import CheckpointMismatchError

    tok = CharTokenizer()
    examples = [{"prompt": d["prompt"], "response": d["answer"]} for d in make_arithmetic_dataset(16, 0, max_operand=9)]

    def run(model, steps, resume):
        config = sft.SFTConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=steps, progress=False,
                                             resume=resume, export_hf=False),
                               optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16)
        return sft.train(config, policy=model, tokenizer=tok, examples=examples)

    unrolled, stacked = _pair()
    run(stacked, 2, resume=False)
    with pytest.raises(CheckpointMismatchError, match=r"the checkpoint stores the decoder stacked \(scan_layers=True\), "
                                                      r"the model being restored per layer"):
        run(unrolled, 3, resume=True)
    assert is_stacked(run(stacked, 3, resume=True).model)  # the same layout resumes
