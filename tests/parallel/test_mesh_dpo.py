"""DPO on one device and on 2×2×2 / 1×4×2 meshes: same per-step metrics, same final
weights, sharded result; a separate reference model, or LoRA with the base model as a
precomputed (cached) reference; ``evaluate`` on the mesh."""

import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.train.dpo import DPOConfig, evaluate, train
from jaxrl_llm.train.lora import LoRAConfig
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig

from tests.train.test_dpo import synthetic_pairs

from .mesh_runs import MESHES, check_trainer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _model(seed):
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed))


def _config(out, mesh, **kw):
    fields = dict(run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
                  optim=OptimConfig(learning_rate=1e-2), beta=0.1, batch_size=4, max_len=16, mesh=mesh)
    return DPOConfig(**{**fields, **kw})


@pytest.mark.parametrize("reference, kw", [
    ("separate", dict(length_normalize=True, sft_weight=0.5)),
    ("initial", dict(precompute_reference=True, lora=LoRAConfig(rank=4))),
], ids=["separate_ref", "cached_initial_ref_lora"])
def test_dpo_same_on_every_mesh(tmp_path, reference, kw):
    """A reference model computed inside the step (length-normalised, with an NLL term on
    chosen); LoRA adapters (replicated) over the sharded frozen base, whose log-probs are
    precomputed once over the data on the mesh as the reference."""
    data = synthetic_pairs(16, 0)

    def run(mesh, out):
        ref = _model(1) if reference == "separate" else None
        return train(_config(out, mesh, **kw), policy=_model(0), tokenizer=CharTokenizer(), preferences=data,
                     reference=ref)

    # With the initial policy as reference (LoRA B = 0), every step-0 margin is 0 up to
    # rounding, so reward_accuracy and ties (margin > 0, margin == 0) are rounding there.
    tied = () if reference == "separate" else ("reward_accuracy", "ties")
    results = check_trainer(run, tmp_path, tied_at_start=tied)
    if reference == "separate":
        assert results["1x1x1"].history[0]["reward_margin"] != 0.0  # the reference is not the initial policy
    else:
        for result in results.values():
            assert abs(result.history[0]["reward_margin"]) < 1e-5  # the tie that makes step 0 rounding
            assert abs(result.history[-1]["reward_margin"]) > 1e-3  # later steps are compared in full


def test_evaluate_same_on_every_mesh(tmp_path):
    """``evaluate`` places policy and reference on ``config.mesh`` and splits the rows
    (the padded last batch too)."""
    held_out = synthetic_pairs(10, 1)
    values = {name: evaluate(_config(tmp_path, mesh), policy=_model(0), tokenizer=CharTokenizer(),
                             preferences=held_out, reference=_model(1))
              for name, mesh in MESHES.items()}
    for name in MESHES:
        assert values[name] == pytest.approx(values["1x1x1"], rel=1e-5, abs=1e-6), name
    assert values["1x1x1"]["num_pairs"] == 10


def test_batch_that_does_not_split_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^batch_size=6 is not divisible by mesh.data × mesh.fsdp = 4"):
        train(_config(tmp_path, MeshConfig(2, 2, 2), batch_size=6), policy=_model(0), tokenizer=CharTokenizer(),
              preferences=synthetic_pairs(16, 0))
