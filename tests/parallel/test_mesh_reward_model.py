"""Reward-model training on one device and on 2×2×2 / 1×4×2 meshes: same per-step metrics
(held-out accuracy / AUC included), same final weights, sharded result."""

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, RewardModel, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.reward_model import RewardConfig, train

from .mesh_runs import check_trainer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _pairs(n, seed):
    """Random strings; the one with more 'a's is chosen, the count difference is the margin."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        x, y = ("".join(rng.choice(list("abcde"), 6)) for _ in range(2))
        if x.count("a") != y.count("a"):
            c, r = (x, y) if x.count("a") > y.count("a") else (y, x)
            out.append({"prompt": "s:", "chosen": c, "rejected": r, "margin": float(c.count("a") - r.count("a"))})
    return out


def _kwise(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        resp = ["".join(rng.choice(list("abc"), 6)) for _ in range(3)]
        out.append({"prompt": "s:", "responses": resp, "scores": [r.count("a") + 0.01 * i for i, r in enumerate(resp)]})
    return out


def _config(out, mesh, **kw):
    fields = dict(run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
                  optim=OptimConfig(learning_rate=1e-2), batch_size=8, max_len=16, eval_batch_size=4,
                  save_hf=False, mesh=mesh)
    return RewardConfig(**{**fields, **kw})


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_reward_model_same_on_every_mesh(tmp_path, loss):
    """Bradley–Terry with a per-pair margin, centring and a length penalty, evaluated on
    held-out pairs at the end (a padded last eval batch); Plackett–Luce on K = 3 from a
    CausalLM (its backbone under a fresh head, placed on the mesh)."""
    if loss == "bradley_terry":
        kw = dict(margin_field="margin", center_coef=0.01, length_penalty=0.01)
        data, held_out, model_cls = _pairs(32, 0), _pairs(10, 1), RewardModel
    else:
        kw, data, held_out, model_cls = {}, _kwise(24, 0), None, CausalLM

    def run(mesh, out):
        model = model_cls(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        return train(_config(out, mesh, loss=loss, **kw), model=model, tokenizer=CharTokenizer(),
                     preferences=data, eval_preferences=held_out)

    results = check_trainer(run, tmp_path)
    if held_out is not None:  # the held-out metrics were among those compared
        assert "eval_auc" in results["1x1x1"].history[-1]


@pytest.mark.parametrize("kw, field", [
    (dict(batch_size=6), r"^batch_size=6 is not divisible by mesh.data × mesh.fsdp = 4"),
    (dict(eval_batch_size=6), r"^eval_batch_size=6 is not divisible by mesh.data × mesh.fsdp = 4"),
])
def test_rows_that_do_not_split_fail_naming_the_field(tmp_path, kw, field):
    model = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=field):
        train(_config(tmp_path, MeshConfig(2, 2, 2), **kw), model=model, tokenizer=CharTokenizer(),
              preferences=_pairs(16, 0), eval_preferences=_pairs(4, 1))
