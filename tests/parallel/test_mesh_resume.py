"""Checkpoints are sharded and resume onto a different mesh: a GRPO run checkpointed on
8×1×1 and resumed on 2×2×2 (and SFT saved on 2×2×2, resumed on 1×4×2) continues exactly
like the uninterrupted run."""

import shutil

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train import grpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig

from .mesh_runs import assert_same_metrics, assert_same_params, assert_sharded

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
STEPS = 3


def _drop_last_checkpoint(out):
    """As if the run had been stopped after step STEPS - 1: its last checkpoint is gone."""
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    assert (out / "checkpoints" / str(STEPS - 1)).is_dir()


def _resume_on_other_mesh(run, tmp_path, first: MeshConfig, second: MeshConfig):
    uninterrupted = run(first, tmp_path / "uninterrupted", resume=False)
    out = tmp_path / "resumed"
    run(first, out, resume=False)
    _drop_last_checkpoint(out)
    resumed = run(second, out, resume=True)
    # the resumed run re-ran only the last step, on the other mesh
    assert [row["step"] for row in resumed.history] == list(range(STEPS))
    results = {"uninterrupted": uninterrupted, "resumed": resumed}
    assert_same_metrics(results)
    assert_same_params(results)
    assert_sharded(resumed.model, second)
    return results


def test_grpo_checkpoint_on_8x1x1_resumes_on_2x2x2(tmp_path):
    data = make_arithmetic_dataset(32, 0, max_operand=9)

    def run(mesh, out, resume):
        config = grpo.GRPOConfig.preset(
            "dapo", run=RunConfig(output_dir=str(out), total_steps=STEPS, checkpoint_every=1, resume=resume,
                                  progress=False, export_hf=False),
            optim=OptimConfig(learning_rate=1e-2), prompts_per_step=8, group_size=4, max_prompt_len=8,
            max_new_tokens=6, mesh=mesh)
        model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        return grpo.train(config, policy=model, tokenizer=CharTokenizer(), prompts=data,
                          reward_fn=lambda p, c, **k: [float(len(x) % 2 == 0) for x in c])

    _resume_on_other_mesh(run, tmp_path, MeshConfig(8, 1, 1), MeshConfig(2, 2, 2))


def test_sft_checkpoint_on_2x2x2_resumes_on_1x4x2(tmp_path):
    examples = [{"prompt": d["prompt"], "response": d["answer"]} for d in make_arithmetic_dataset(32, 0)]

    def run(mesh, out, resume):
        config = sft.SFTConfig(
            run=RunConfig(output_dir=str(out), total_steps=STEPS, checkpoint_every=1, resume=resume,
                          progress=False, export_hf=False),
            optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, mesh=mesh)
        model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        return sft.train(config, policy=model, tokenizer=CharTokenizer(), examples=examples)

    results = _resume_on_other_mesh(run, tmp_path, MeshConfig(2, 2, 2), MeshConfig(1, 4, 2))
    # every restored array (params and the rest of the model state) lives on the new mesh
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(nnx.state(results["resumed"].model)))
    assert np.isfinite(results["resumed"].history[-1]["loss"])
