"""Micro-batched updates equal whole-batch updates: the weighted accumulation against
``jax.value_and_grad`` of the whole batch for every aggregation mode, then SFT and GRPO
runs with ``microbatches=2`` against ``microbatches=1`` (one device and a 2×2×2 mesh)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.train import grpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.microbatch import accumulated_value_and_grad, row_weights
from jaxrl_llm.train.optim import OptimConfig
from tests.parallel.mesh_runs import assert_same_metrics, assert_same_params

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _toy_batch(seed=0, rows=8, t=6):
    """Ragged masks: lengths 0..t, so micro-batches hold different token counts (and one
    row has no valid token at all)."""
    rng = np.random.default_rng(seed)
    lengths = rng.permutation(np.arange(rows) % (t + 1))
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return {"x": rng.normal(size=(rows, t, 3)).astype(np.float32), "mask": mask,
            "adv": rng.normal(size=rows).astype(np.float32)}


class AccumulationTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(mode=ops.AGGREGATION_MODES, k=(2, 4))
    def test_equals_whole_batch_gradient(self, mode, k):
        batch = _toy_batch()
        params = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}

        def loss_fn(p, b):
            per_token = jnp.tanh(b["x"] @ p["w"] + p["b"]) * b["adv"][:, None]
            loss = ops.aggregate_loss(per_token, b["mask"], mode)
            return loss, {"loss_copy": loss}

        whole = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        weights = row_weights(batch["mask"], mode)
        micro = self.variant(lambda p, b, w: accumulated_value_and_grad(loss_fn, p, b, w, k))(params, batch, weights)
        chex.assert_trees_all_close(micro, whole, rtol=1e-5, atol=1e-6)
        # the unweighted mean of micro-batch means is a different (biased) number
        means = [loss_fn(params, jax.tree.map(lambda x, j=j: x[j::k], batch))[0] for j in range(k)]
        if mode == "token_mean":
            assert abs(float(np.mean(means)) - float(whole[0][0])) > 1e-4  # 100x the tolerance above

    def test_micro_batch_without_valid_rows_adds_nothing(self):
        batch = _toy_batch()
        batch["mask"][0::2] = 0.0  # micro-batch 0 of 2 (rows 0, 2, 4, 6) has no valid token: 0/0 inside
        params = {"w": jnp.array([0.3, -0.2, 0.5])}

        def loss_fn(p, b):
            per_seq = jnp.sum(jnp.tanh(b["x"] @ p["w"]) * b["mask"], -1) / jnp.sum(b["mask"], -1)  # NaN rows
            keep = jnp.sum(b["mask"], -1) > 0
            loss = jnp.sum(jnp.where(keep, per_seq, 0.0)) / jnp.sum(keep)  # NaN for an empty micro-batch
            return loss, {}

        weights = row_weights(batch["mask"], "seq_mean_token_mean")
        (loss, _), grads = accumulated_value_and_grad(loss_fn, params, batch, weights, 2)
        (want, _), want_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, jax.tree.map(lambda x: x[1::2], batch))
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-5)


def _sft_run(out, mesh, microbatches, loss_agg):
    examples = [{"prompt": d["prompt"], "response": d["answer"] * (1 + i % 3)}  # ragged responses
                for i, d in enumerate(make_arithmetic_dataset(32, 0))]
    config = sft.SFTConfig(run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
                           optim=OptimConfig(learning_rate=1e-2), batch_size=16, max_len=16, loss_agg=loss_agg,
                           microbatches=microbatches, mesh=mesh)
    return sft.train(config, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)),
                     tokenizer=CharTokenizer(), examples=examples)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_sft_microbatches_equal_whole_batch(tmp_path, loss_agg):
    one = MeshConfig(1, 1, 1, num_devices=1)
    results = {
        "whole batch": _sft_run(tmp_path / "a", one, 1, loss_agg),
        "4 micro-batches": _sft_run(tmp_path / "b", one, 4, loss_agg),
        "2 micro-batches on 2x2x2": _sft_run(tmp_path / "c", MeshConfig(2, 2, 2), 2, loss_agg),
    }
    assert_same_metrics(results)
    assert_same_params(results)


def _grpo_run(out, mesh, microbatches, preset):
    config = grpo.GRPOConfig.preset(
        preset, run=RunConfig(output_dir=str(out), total_steps=3, progress=False, export_hf=False),
        optim=OptimConfig(learning_rate=1e-2), prompts_per_step=8, group_size=2, max_prompt_len=8,
        max_new_tokens=6, microbatches=microbatches, mesh=mesh)
    return grpo.train(config, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)),
                      tokenizer=CharTokenizer(), prompts=make_arithmetic_dataset(32, 0, max_operand=9),
                      reward_fn=lambda p, c, **k: [float(len(x) % 2 == 0) for x in c])


@pytest.mark.parametrize("preset", ["grpo", "dapo"])  # seq_mean_token_mean + KL; token_mean + clip-higher
def test_grpo_microbatches_equal_whole_batch(tmp_path, preset):
    one = MeshConfig(1, 1, 1, num_devices=1)
    results = {
        "whole batch": _grpo_run(tmp_path / "a", one, 1, preset),
        "2 micro-batches on 2x2x2": _grpo_run(tmp_path / "b", MeshConfig(2, 2, 2), 2, preset),
    }
    assert_same_metrics(results)
    assert_same_params(results)


def test_ppo_microbatches_equal_whole_batch(tmp_path):
    """Policy, critic (GAE) and KL-in-reward: 2 micro-batches of each minibatch of 8 rows."""
    from tests.parallel.test_mesh_ppo import PROMPTS, _config, count_reward

    from jaxrl_llm.train import ppo

    def run(out, mesh, microbatches):
        config = _config(out, mesh, prompts_per_step=8, minibatches=1, microbatches=microbatches)
        return ppo.train(config, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)),
                         tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=count_reward)

    results = {"whole batch": run(tmp_path / "a", MeshConfig(1, 1, 1, num_devices=1), 1),
               "2 micro-batches on 2x2x2": run(tmp_path / "b", MeshConfig(2, 2, 2), 2)}
    assert_same_metrics(results)
    assert_same_params(results)
    assert_same_params(results, model_of=lambda r: r.critic)


def test_microbatches_must_divide_the_rows():
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by microbatches=4"):
        sft.SFTConfig(batch_size=6, microbatches=4)
    with pytest.raises(ValueError, match=r"prompts_per_step \* group_size / minibatches = 8 must be divisible by microbatches=3"):
        grpo.GRPOConfig(prompts_per_step=4, group_size=2, microbatches=3)
    from jaxrl_llm.train.ppo import PPOConfig

    with pytest.raises(ValueError, match="minibatch of 4 rows must be divisible by microbatches=3"):
        PPOConfig(prompts_per_step=4, samples_per_prompt=2, minibatches=2, microbatches=3)
