"""GRPO on one device and on 2×2×2 / 1×4×2 meshes: same per-step metrics (rewards,
sampling rounds, losses, KL) and final weights; the mesh runs really split the weights."""

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train.grpo import GRPOConfig, train
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig

from .mesh_runs import check_trainer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _parity_reward(prompts, completions, **columns):
    """Reward 1 for an even-length completion: varies within groups of a random tiny model."""
    return [float(len(c) % 2 == 0) for c in completions]


def _config(out, mesh, preset, **kw):
    base = dict(run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
                optim=OptimConfig(learning_rate=1e-2), prompts_per_step=4, group_size=4, max_prompt_len=8,
                max_new_tokens=6, mesh=mesh)
    return GRPOConfig.preset(preset, **{**base, **kw})


@pytest.mark.parametrize("preset, kw", [
    # DAPO: dynamic sampling on (several sampling rounds, groups kept across rounds)
    ("dapo", dict(max_sampling_rounds=3)),
    # GRPO with a KL term to the reference, 2 inner updates (old log-probs) in 2 minibatches
    ("grpo", dict(num_inner_updates=2, minibatches=2, prompts_per_step=8, group_size=2)),
])
def test_grpo_same_on_every_mesh(tmp_path, preset, kw):
    data = make_arithmetic_dataset(32, 0, max_operand=9)

    def run(mesh, out):
        model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        return train(_config(out, mesh, preset, **kw), policy=model, tokenizer=CharTokenizer(), prompts=data,
                     reward_fn=_parity_reward)

    results = check_trainer(run, tmp_path)
    history = results["1x1x1"].history
    if preset == "dapo":
        assert max(row["sampling_rounds"] for row in history) > 1  # dynamic sampling really resampled
    else:
        assert all(row["kl"] >= 0 for row in history) and max(row["kl"] for row in history) > 0
    # (DAPO's score adds the overlong penalty, so only accuracy is bounded by [0, 1])
    assert all(np.isfinite(row["reward_mean"]) and 0.0 <= row["accuracy"] <= 1.0 for row in history)


@pytest.mark.parametrize("kw, field", [
    (dict(prompts_per_step=6), "prompts_per_step=6"),
    (dict(prompts_per_step=4, group_size=2, minibatches=4), "prompts_per_step \\* group_size / minibatches=2"),
])
def test_rows_that_do_not_split_fail_naming_the_field(tmp_path, kw, field):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    config = _config(tmp_path, MeshConfig(2, 2, 2), "grpo", **kw)
    with pytest.raises(ValueError, match=field):
        train(config, policy=model, tokenizer=CharTokenizer(), prompts=make_arithmetic_dataset(8, 0),
              reward_fn=_parity_reward)


def test_tensor_size_that_does_not_divide_heads_fails(tmp_path):
    model = CausalLM(tiny_config("llama", **{**TINY, "num_heads": 6, "num_kv_heads": 2}), rngs=nnx.Rngs(0))
    config = _config(tmp_path, MeshConfig(2, 1, 4), "grpo")
    with pytest.raises(ValueError, match="mesh.tensor=4 does not divide the model's num_heads=6"):
        train(config, policy=model, tokenizer=CharTokenizer(), prompts=make_arithmetic_dataset(8, 0),
              reward_fn=_parity_reward)
