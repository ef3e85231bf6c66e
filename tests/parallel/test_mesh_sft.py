"""SFT on one device and on 2×2×2 / 1×4×2 meshes: same metrics, same weights, sharded result."""

import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train.lora import LoRAConfig
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.sft import SFTConfig, train

from .mesh_runs import check_trainer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _examples(n=32):
    return [{"prompt": d["prompt"], "response": d["answer"]} for d in make_arithmetic_dataset(n, 0)]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sft_same_on_every_mesh(tmp_path, lora_rank):
    def run(mesh: MeshConfig, out):
        model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        config = SFTConfig(
            run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
            optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, pack=True, mesh=mesh,
            lora=LoRAConfig(rank=lora_rank),
        )
        return train(config, policy=model, tokenizer=CharTokenizer(), examples=_examples())

    check_trainer(run, tmp_path)


def test_sft_batch_that_does_not_split_is_an_error_naming_the_field(tmp_path):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    config = SFTConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=1, progress=False),
                       batch_size=6, max_len=16, mesh=MeshConfig(2, 2, 2))
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by mesh.data × mesh.fsdp = 4"):
        train(config, policy=model, tokenizer=CharTokenizer(), examples=_examples())


def test_sft_from_a_local_hf_checkpoint_loads_straight_into_the_mesh(tmp_path):
    """``policy="path"``: every tensor is read from safetensors and put into its sharding
    (``load_hf(sharding_fn=...)``); the run equals the one from the in-memory model."""
    import jax

    from jaxrl_llm.models import save_hf
    from jaxrl_llm.parallel import Placement
    from jaxrl_llm.train.policy import placed_model

    ckpt = tmp_path / "ckpt"
    save_hf(CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), str(ckpt))
    placement = Placement.create(MeshConfig(1, 4, 2))
    loaded = placed_model(str(ckpt), placement)
    q = nnx.state(loaded, nnx.Param)["model"]["layers"][0]["attn"]["q_proj"][...]
    assert q.sharding.mesh.shape == placement.mesh.shape
    assert q.addressable_shards[0].data.shape == (TINY["hidden_size"] // 4, TINY["num_heads"] // 2, TINY["head_dim"])
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(nnx.state(loaded)))

    def run(mesh: MeshConfig, out):
        config = SFTConfig(
            run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
            optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, mesh=mesh)
        return train(config, policy=str(ckpt), tokenizer=CharTokenizer(), examples=_examples())

    check_trainer(run, tmp_path)
