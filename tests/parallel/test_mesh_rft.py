"""RFT on one device and on 2×2×2 / 1×4×2 meshes: same sampling metrics (rewards, kept
counts), same SFT losses and final weights; the mesh runs really split the weights."""

import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.rft import RFTConfig, train

from .mesh_runs import check_trainer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _parity_reward(prompts, completions, **columns):
    """Reward 1 for an even character sum: varies within groups of a random tiny model."""
    return [float(sum(map(ord, c)) % 2 == 0) for c in completions]


def _config(out, mesh, **kw):
    # 2 steps per iteration over 3 steps: iteration 1 samples with the fine-tuned policy
    base = dict(run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
                optim=OptimConfig(learning_rate=1e-2), prompts_per_iteration=8, samples_per_prompt=4,
                sampling_batch_size=4, steps_per_iteration=2, batch_size=8, max_prompt_len=8, max_new_tokens=6,
                selection="threshold", reward_threshold=0.5, max_per_prompt=2, drop_unfinished=False, mesh=mesh)
    return RFTConfig(**{**base, **kw})


def test_rft_same_on_every_mesh(tmp_path):
    data = make_arithmetic_dataset(32, 0, max_operand=9)

    def run(mesh, out):
        model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        return train(_config(out, mesh), policy=model, tokenizer=CharTokenizer(), prompts=data,
                     reward_fn=_parity_reward)

    results = check_trainer(run, tmp_path)
    history = results["1x1x1"].history
    assert [row["iteration"] for row in history] == [0, 0, 1]
    assert all(row["kept"] > 0 and row["skipped_no_data"] == 0 for row in history)  # every step trained


@pytest.mark.parametrize("kw, field", [
    (dict(prompts_per_iteration=12, sampling_batch_size=6), "sampling_batch_size=6"),
    (dict(batch_size=6), "batch_size=6"),
])
def test_rows_that_do_not_split_fail_naming_the_field(tmp_path, kw, field):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"^{field} is not divisible by mesh.data × mesh.fsdp = 4"):
        train(_config(tmp_path, MeshConfig(2, 2, 2), **kw), policy=model, tokenizer=CharTokenizer(),
              prompts=make_arithmetic_dataset(8, 0), reward_fn=_parity_reward)
