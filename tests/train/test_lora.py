"""LoRA: the adapter algebra against numpy, and SFT / GRPO training only the adapters."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, count_params, tiny_config
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train import grpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, count, init_lora
from jaxrl_llm.train.optim import OptimConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _model():
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))


def _leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_adapter_algebra_matches_numpy():
    params = nnx.state(_model(), nnx.Param)
    config = LoRAConfig(rank=3, alpha=6.0)
    adapters = init_lora(params, config, jax.random.PRNGKey(0))
    base, start = _leaves(params), _leaves(apply_lora(params, adapters, config))
    assert all(np.array_equal(base[k], start[k]) for k in base)  # B = 0: starts at the base model
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    merged = _leaves(apply_lora(params, adapters, config))
    for name, w in base.items():
        key = [k for k in adapters if k.replace("_", "") == "".join(c for c in name if c.isalnum())]
        if "q_proj" in name or "o_proj" in name or "down_proj" in name:
            a, b = np.asarray(adapters[key[0]]["a"]), np.asarray(adapters[key[0]]["b"])
            expected = w + (a @ b).reshape(w.shape) * 2.0  # alpha / rank
            np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)
        elif "embed" in name or "norm" in name:
            np.testing.assert_array_equal(merged[name], w)
    assert count(adapters) < 0.5 * count_params(_model())
    with pytest.raises(ValueError, match="match no parameter"):
        init_lora(params, LoRAConfig(rank=2, targets=("nope",)), jax.random.PRNGKey(0))


def test_sft_and_grpo_train_only_adapters(tmp_path):
    tok = CharTokenizer()
    data = make_arithmetic_dataset(32, 0, max_operand=9)
    model = _model()
    base = _leaves(nnx.state(model, nnx.Param))
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))
    sft_config = sft.SFTConfig(run=RunConfig(output_dir=str(tmp_path / "sft"), total_steps=20, progress=False),
                               optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, lora=lora)
    result = sft.train(sft_config, policy=model, tokenizer=tok,
                       examples=[{"prompt": d["prompt"], "response": d["answer"]} for d in data])
    losses = [r["loss"] for r in result.history]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    tuned = _leaves(nnx.state(result.model, nnx.Param))
    for name in base:
        changed = not np.array_equal(base[name], tuned[name])
        assert changed == any(t in name for t in lora.targets), name
    rl_config = grpo.GRPOConfig.preset("grpo", run=RunConfig(output_dir=str(tmp_path / "grpo"), total_steps=2, progress=False),
                                       optim=OptimConfig(learning_rate=1e-2), prompts_per_step=2, group_size=4,
                                       max_prompt_len=8, max_new_tokens=4, lora=lora, num_inner_updates=2)
    rl = grpo.train(rl_config, policy=result.model, tokenizer=tok, prompts=data,
                    reward_fn=lambda p, c, **k: [float(len(x) % 2) for x in c])
    assert all(np.isfinite(r["loss"]) for r in rl.history)
    after = _leaves(nnx.state(rl.model, nnx.Param))
    assert all(np.array_equal(after[n], tuned[n]) for n in tuned if not any(t in n for t in lora.targets))


def test_dpo_and_ppo_train_only_adapters(tmp_path):
    from jaxrl_llm.train import dpo, ppo

    tok = CharTokenizer()
    lora = LoRAConfig(rank=2, targets=("q_proj", "down_proj"))
    model = _model()
    base = _leaves(nnx.state(model, nnx.Param))
    prefs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(8)]
    d = dpo.train(dpo.DPOConfig(run=RunConfig(output_dir=str(tmp_path / "dpo"), total_steps=3, progress=False),
                                optim=OptimConfig(learning_rate=1e-2), batch_size=4, max_len=16, lora=lora),
                  policy=model, tokenizer=tok, preferences=prefs)
    data = make_arithmetic_dataset(16, 0, max_operand=9)
    p = ppo.train(ppo.PPOConfig(run=RunConfig(output_dir=str(tmp_path / "ppo"), total_steps=2, progress=False),
                                optim=OptimConfig(learning_rate=1e-2), prompts_per_step=2, max_prompt_len=8,
                                max_new_tokens=4, ppo_epochs=2, lora=lora),
                  policy=_model(), tokenizer=tok, prompts=data, reward_fn=lambda pr, c, **k: [float(len(x)) for x in c])
    for result in (d, p):
        tuned = _leaves(nnx.state(result.model, nnx.Param))
        for name in base:
            changed = not np.array_equal(base[name], tuned[name])
            assert changed == any(t in name for t in lora.targets), name
