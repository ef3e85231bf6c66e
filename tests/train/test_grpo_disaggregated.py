"""Disaggregated GRPO (sampler and trainer on disjoint sub-meshes) and the reward worker
pool: the weights reach the sampler unchanged and only on its devices, a disaggregated
run samples what a colocated one does, asynchronous disaggregated runs keep the
staleness bound, and scoring on worker threads gives the one-call scores and failures."""

import threading

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.rewards.combine import safe_reward_fn
from jaxrl_llm.train.async_sampling import make_role_placements
from jaxrl_llm.train.grpo import GRPOConfig, train
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import split_model

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TOK = CharTokenizer()
DATA = make_arithmetic_dataset(32, 0, max_operand=9)
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def reward(prompts, completions, **columns):
    return [float(len(c) % 2) for c in completions]


def _policy():
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))


def _config(out, steps=3, **kw):
    fields = dict(run=RunConfig(output_dir=str(out), total_steps=steps, progress=False), kl_coef=0.0,
                  optim=OptimConfig(learning_rate=1e-2), prompts_per_step=4, group_size=4, max_prompt_len=8,
                  max_new_tokens=6, tis_cap=2.0, mesh=MeshConfig(data=4, num_devices=4))
    fields.update(kw)
    return GRPOConfig(**fields)


DISAGGREGATED = dict(placement="disaggregated", mesh=MeshConfig(data=4), sampler_mesh=MeshConfig(data=4, num_devices=4))


def _devices(tree) -> set:
    return {d for leaf in jax.tree.leaves(tree) for d in leaf.sharding.device_set}


@needs_8
def test_weights_move_to_the_sampler_unchanged_and_only_onto_its_devices():
    roles = make_role_placements(GRPOConfig(**DISAGGREGATED), _policy(), {"rows": 16}, {"prompts": 4})
    trainer_devices, sampler_devices = set(roles.trainer.mesh.devices.flat), set(roles.sampler.mesh.devices.flat)
    assert roles.disaggregated and len(trainer_devices) == len(sampler_devices) == 4
    assert trainer_devices.isdisjoint(sampler_devices)
    assert sampler_devices == set(jax.devices()[4:])  # the sampler takes the last devices
    params = roles.trainer.place(split_model(_policy()).params)
    assert _devices(params) == trainer_devices
    copy = roles.to_sampler(params)
    assert _devices(copy) == sampler_devices
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(copy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    colocated = make_role_placements(GRPOConfig(mesh=MeshConfig(data=4, num_devices=4)), _policy(), {"rows": 16}, {"prompts": 4})
    assert not colocated.disaggregated and colocated.to_sampler(params) is params


@needs_8
def test_disaggregated_run_samples_what_a_colocated_one_does(tmp_path):
    """Synchronous (k=0): the sampler's 4 devices hold the same weights as the trainer's,
    so every step samples the same tokens and trains the same way."""
    colocated = train(_config(tmp_path / "co"), policy=_policy(), tokenizer=TOK, prompts=DATA, reward_fn=reward)
    split = train(_config(tmp_path / "dis", **DISAGGREGATED), policy=_policy(), tokenizer=TOK, prompts=DATA,
                  reward_fn=reward)
    for a, b in zip(colocated.history, split.history):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length_mean"] == b["response_length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    for x, y in zip(jax.tree.leaves(nnx.state(colocated.model, nnx.Param)), jax.tree.leaves(nnx.state(split.model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@needs_8
@pytest.mark.parametrize("staleness", [1, 2])
def test_asynchronous_disaggregated_run_keeps_the_staleness_bound(tmp_path, staleness):
    rows = train(_config(tmp_path, steps=4, max_staleness=staleness, reward_workers=2, **DISAGGREGATED),
                 policy=_policy(), tokenizer=TOK, prompts=DATA, reward_fn=reward).history
    assert [r["staleness"] for r in rows] == [min(s, staleness) for s in range(4)]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["is_mean"] for r in rows)


def test_disaggregated_needs_devices_for_both_roles():
    with pytest.raises(ValueError, match=r"sampler_mesh.num_devices=.* leaves 0 for the trainer"):
        make_role_placements(GRPOConfig(placement="disaggregated", sampler_mesh=MeshConfig(num_devices=jax.device_count())),
                             _policy(), {}, {})


def _flaky_reward(prompts, completions, answer):
    """Fails on completions containing "x"; NaN on "n"; else the answer's parity."""
    out = []
    for c, a in zip(completions, answer):
        if "x" in c:
            raise ValueError(f"cannot parse {c!r}")
        out.append(float("nan") if "n" in c else float(int(a) % 2))
    return out


def test_reward_workers_give_the_one_call_scores_and_failures():
    completions = ["1", "x2", "3", "n", "5", "6", "x", "8", "9", "10", "n1"]
    answer = [str(i) for i in range(len(completions))]
    one = safe_reward_fn(_flaky_reward)
    many = safe_reward_fn(_flaky_reward, workers=4)
    expected = one(["p"] * len(completions), completions, answer=answer)
    got = many(["p"] * len(completions), completions, answer=answer)
    assert got == expected
    assert [(f.index, f.reason) for f in many.last_failures] == [(f.index, f.reason) for f in one.last_failures]
    assert [f.index for f in many.last_failures] == [1, 3, 6, 10]
    assert many.num_failed == 4 and many.num_samples == len(completions)


def test_reward_workers_score_slices_concurrently():
    """Four slices meet at a barrier: only a call that runs them at the same time passes."""
    barrier = threading.Barrier(4, timeout=10)

    def waits(prompts, completions):
        barrier.wait()
        return [1.0] * len(completions)

    fn = safe_reward_fn(waits, workers=4)
    assert fn(["p"] * 8, ["c"] * 8) == [1.0] * 8 and fn.last_failures == []


def test_reward_workers_is_checked():
    with pytest.raises(ValueError, match=r"workers: expected an int >= 1"):
        safe_reward_fn(reward, workers=0)
