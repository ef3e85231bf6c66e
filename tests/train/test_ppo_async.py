"""Asynchronous and disaggregated PPO (``train.async_sampling``, as GRPO): the threaded
pipeline held to staleness 0 is the synchronous trainer, the staleness bound holds (and
the pipeline drains before checkpoints), resume is exact, a disaggregated run samples on
the sampler's devices only and trains like a colocated one, and the rollout-correction
weights (trainer's log-probs over the sampler's) reach the policy-gradient term."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CharTokenizer, RewardModel, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.train import ppo
from jaxrl_llm.train.async_sampling import make_role_placements
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.policy import split_model
from jaxrl_llm.train.ppo import LossOptions, PPOConfig, make_critic, ppo_loss, train
from tests.train.test_ppo import TINY, PROMPTS, _fixed_batch, base_config, count_reward, ref_loss, tiny_policy

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
# test_ppo's shapes (N = 8 rows, P = T = 8) on the 4 devices its default mesh uses, with
# rollout correction and a replay buffer (minibatches of 4 rows, 8 once it is full): every
# run below shares these compiled programs.
MESH4 = MeshConfig(data=4, num_devices=4)
SHARED = dict(mesh=MESH4, tis_cap=2.0, replay_capacity=16, replay_rows=8)
DISAGGREGATED = dict(placement="disaggregated", mesh=MeshConfig(data=4), sampler_mesh=MeshConfig(data=4, num_devices=4))


def _config(tmp_path, name, steps=3, **kw):
    run = kw.pop("run", None) or RunConfig(output_dir=str(tmp_path / name), total_steps=steps, progress=False)
    return base_config(tmp_path, name, run=run, **{**SHARED, **kw})


def _run(config, reward_model=None):
    """A run scored by a reward function (in the sampler's thread) plus a reward model (in
    the trainer's, on the trainer's devices)."""
    reward_model = reward_model or RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(5))
    return train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=count_reward,
                 reward_model=reward_model)


def _strip(rows):
    """Metrics that do not depend on timing."""
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _params(result):
    return nnx.state(result.model, nnx.Param), nnx.state(result.critic, nnx.Param)


def _devices(tree) -> set:
    return {d for leaf in jax.tree.leaves(tree) for d in leaf.sharding.device_set}


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    """The synchronous colocated trainer (max_staleness=0) with rollout correction and
    replayed rows."""
    return _run(_config(tmp_path_factory.mktemp("sync"), "sync"))


# ---------------------------------------------------------------- (a) synchronous


def test_threaded_pipeline_held_to_staleness_zero_is_the_synchronous_trainer(tmp_path, sync_run):
    """max_staleness=2 with a checkpoint after every step: the pipeline never samples
    across a checkpoint, so the sampler thread draws each step with the current policy.
    Sampling and reward scoring in the thread, the prompt loader's state carried in the
    result: step for step the same metrics and the same final weights."""
    threaded = _run(_config(tmp_path, "threaded", max_staleness=2,
                            run=RunConfig(output_dir=str(tmp_path / "threaded"), total_steps=3, progress=False,
                                          checkpoint_every=1)))
    assert [r["staleness"] for r in sync_run.history] == [r["staleness"] for r in threaded.history] == [0, 0, 0]
    assert _strip(threaded.history) == _strip(sync_run.history)
    chex.assert_trees_all_equal(_params(threaded), _params(sync_run))
    for row in sync_run.history:
        assert np.isfinite(row["loss"]) and "is_mean" in row and "rollout_mismatch_abs" in row
        assert row["rollout_mismatch_abs"] < 1e-4  # the same policy samples and trains: float noise only


# ---------------------------------------------------------------- (b, e) staleness and weights


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    """max_staleness=2, tis_cap=1 (every weight is min(w, 1)), with spies on the rollout
    correction's inputs / outputs and on the update batches."""
    tmp = tmp_path_factory.mktemp("async")
    corrections, batches = [], []
    real_correction, real_update = ppo.ops.rollout_correction, ppo._update_step

    def correction(train_logp, rollout_logp, mask, **kw):
        out = real_correction(train_logp, rollout_logp, mask, **kw)
        corrections.append((np.asarray(train_logp), np.asarray(rollout_logp), np.asarray(mask), kw,
                            np.asarray(out[0]), np.asarray(out[1])))
        return out

    def update(params, opt_state, batch, *args, **kw):
        batches.append((len(corrections) - 1, {k: np.asarray(batch[k]) for k in ("old_logp", "tis_weight", "mask")}))
        return real_update(params, opt_state, batch, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo.ops, "rollout_correction", correction)
        mp.setattr(ppo, "_update_step", update)
        result = _run(_config(tmp, "async", steps=4, max_staleness=2, tis_cap=1.0, replay_capacity=0,
                              replay_rows=0))
    return result, corrections, batches


def test_staleness_never_exceeds_the_bound_and_reaches_it(async_run):
    rows = async_run[0].history
    assert [r["staleness"] for r in rows] == [0, 1, 2, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["vf_loss"]) for r in rows)
    # the policy moved between sampling and training: the mismatch grows with staleness
    assert rows[0]["rollout_mismatch_abs"] < 1e-4 < rows[2]["rollout_mismatch_abs"]
    assert all(r["is_frac_high"] > 0 for r in rows[1:])


def test_truncated_weights_are_the_numpy_reference_and_reach_the_update(async_run):
    """weights = min(exp(old_logp − behaviour_logp), C) on valid tokens, where old_logp is
    the trainer's recompute and behaviour_logp the sampler's raw log-probs; each update
    minibatch carries the weights of its rows."""
    _, corrections, batches = async_run
    assert len(corrections) == 4
    for step, (train_logp, rollout_logp, mask, kw, weights, kept) in enumerate(corrections):
        assert kw["upper"] == 1.0 and kw["mode"] == "truncate" and kw["level"] == "token"
        expected = np.where(mask > 0, np.minimum(np.exp(train_logp.astype(np.float64) - rollout_logp), 1.0), 0.0)
        np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(kept, (mask > 0).astype(np.float32))  # truncation rejects nothing
        if step >= 1:
            assert weights[mask > 0].min() < 0.99  # stale batches are down-weighted
        # epoch 0's two minibatches hold every row once: (old_logp, weight) rows match
        mbs = [b for s, b in batches if s == step][:2]
        got = sorted(map(tuple, np.concatenate([np.concatenate([b["old_logp"], b["tis_weight"]], 1) for b in mbs])))
        want = sorted(map(tuple, np.concatenate([train_logp, weights], 1)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_policy_gradient_term_is_weighted_value_loss_is_not():
    """ppo_loss with tis_weight: the clipped surrogate of each token scaled by its weight
    (numpy reference with A·w); the value loss and entropy unchanged."""
    policy = tiny_policy(0)
    critic = make_critic(policy)
    critic.score[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (32, 1))
    psplit, csplit = split_model(policy), split_model(critic)
    values_fn = lambda tok, fm: np.asarray(critic(jnp.asarray(tok), attention_mask=jnp.asarray(fm)))  # noqa: E731
    params = {"policy": psplit.params, "critic": csplit.params}
    graphs, rests = (psplit.graphdef, csplit.graphdef), (psplit.rest, csplit.rest)
    batch, logp, entropy, values, _ = _fixed_batch(policy, values_fn)
    weights = np.random.default_rng(3).uniform(0.0, 2.0, batch["mask"].shape).astype(np.float32)
    opts = LossOptions(prompt_len=5, vf_coef=0.5, entropy_coef=0.01, chunk_size=8)
    loss, metrics = jax.jit(lambda prm, b: ppo_loss(prm, b, rests, graphs, dataclasses.replace(opts, tis=True)))(
        params, {**batch, "tis_weight": weights})
    expected, pg, vf = ref_loss({**batch, "advantages": batch["advantages"] * weights}, logp, entropy, values, opts)
    _, unweighted_pg, _ = ref_loss(batch, logp, entropy, values, opts)
    np.testing.assert_allclose(float(metrics["pg_loss"]), pg, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(metrics["vf_loss"]), vf, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4, atol=2e-5)
    assert abs(pg - unweighted_pg) > 1e-2  # the weights matter on this batch


# ---------------------------------------------------------------- (c) resume


def test_interrupted_and_resumed_async_run_equals_uninterrupted(tmp_path):
    """max_staleness=1, checkpoint after step 1 (the pipeline drains there): a run stopped
    at the checkpoint and resumed samples, scores and trains what the whole run does."""
    run = lambda name, **kw: RunConfig(output_dir=str(tmp_path / name), total_steps=4, progress=False,  # noqa: E731
                                       checkpoint_every=2, **kw)
    # the replay buffer (with its rows' weights), β controller and normaliser are restored too
    kw = dict(max_staleness=1, kl_schedule="adaptive", kl_coef=0.2, kl_target=0.05, kl_horizon=50.0,
              reward_norm=True)
    whole = _run(_config(tmp_path, "whole", run=run("whole"), **kw))
    first = _run(_config(tmp_path, "part", run=dataclasses.replace(run("part"), total_steps=2), **kw))
    resumed = _run(_config(tmp_path, "part", run=run("part", resume=True), **kw))
    assert [r["staleness"] for r in whole.history] == [0, 1, 0, 1]
    assert [r["step"] for r in first.history] == [0, 1] and [r["step"] for r in resumed.history[-2:]] == [2, 3]
    assert _strip(resumed.history[-2:]) == _strip(whole.history[2:])
    assert whole.history[-1]["replay_rows"] == 8 and len({r["kl_coef"] for r in whole.history}) == 4
    chex.assert_trees_all_equal(_params(resumed), _params(whole))


# ---------------------------------------------------------------- (d) disaggregated


@needs_8
def test_role_placements_are_disjoint():
    config = PPOConfig(prompts_per_step=4, samples_per_prompt=2, minibatches=2, **DISAGGREGATED)
    roles = make_role_placements(config, tiny_policy(), *config.role_rows())
    trainer, sampler = set(roles.trainer.mesh.devices.flat), set(roles.sampler.mesh.devices.flat)
    assert roles.disaggregated and len(trainer) == len(sampler) == 4 and trainer.isdisjoint(sampler)
    assert sampler == set(jax.devices()[4:])
    # the trainer's rows need not split over the sampler's mesh, nor the prompts over the trainer's
    assert config.role_rows()[1] == {"prompts_per_step": 4} and "prompts_per_step" not in config.role_rows()[0]


@needs_8
def test_disaggregated_run_samples_on_its_own_devices_and_trains_like_colocated(tmp_path, sync_run, monkeypatch):
    sampled_on = []
    real_generate = ppo.generate

    def generate(model, *args, mesh, **kw):
        sampled_on.append((_devices(nnx.state(model)), set(mesh.devices.flat)))
        return real_generate(model, *args, mesh=mesh, **kw)

    monkeypatch.setattr(ppo, "generate", generate)
    reward_model = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(5))
    split = _run(_config(tmp_path, "dis", **DISAGGREGATED), reward_model)
    sampler, trainer = set(jax.devices()[4:]), set(jax.devices()[:4])
    assert len(sampled_on) == 3 and all(params == mesh == sampler for params, mesh in sampled_on)
    for model in (split.model, split.critic, reward_model):
        assert _devices(nnx.state(model)) == trainer
    # it trains ...
    assert all(np.isfinite(r["loss"]) for r in split.history)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(tiny_policy(), nnx.Param)),
                                                         jax.tree.leaves(nnx.state(split.model, nnx.Param))))
    # ... exactly like the colocated run (max_staleness=0): the sampler runs the same program
    # on 4 other devices with the weights copied bit for bit, and the trainer's mesh is the
    # colocated one. Measured on CPU: metrics and weights identical (also with
    # max_staleness=1, and without rollout correction or replay); a backend whose
    # reductions depended on the device set would need a tolerance here.
    assert _strip(split.history) == _strip(sync_run.history)
    chex.assert_trees_all_equal(_params(split), _params(sync_run))


# ---------------------------------------------------------------- (f) config


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_staleness=-1), "max_staleness must be >= 0"),
    (dict(max_staleness=1.5), "max_staleness must be an int"),
    (dict(placement="remote"), "placement must be one of"),
    (dict(sampler_mesh=MeshConfig(num_devices=2)), "sampler_mesh is set but placement='colocated'"),
    (dict(reward_workers=0), "reward_workers"),
    (dict(tis_cap=0.0), "tis_cap must be > 0"),
    (dict(tis_cap=2.0, tis_level="row"), "tis_level must be one of"),
    (dict(tis_cap=2.0, tis_mode="clip"), "tis_mode must be one of"),
    (dict(tis_mode="mask"), "need tis_cap"),
    (dict(tis_cap=2.0, tis_lower=0.5), "tis_lower"),
    (dict(tis_cap=2.0, tis_mode="mask", tis_lower=3.0), "tis_lower must be < tis_cap"),
    (dict(tis_cap=2.0, tis_veto=1.5), "tis_veto"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


@needs_8
def test_disaggregated_rows_are_checked_against_each_mesh(tmp_path):
    # prompts_per_step=2 does not split over the sampler's 4 data shards
    config = _config(tmp_path, "bad", prompts_per_step=2, samples_per_prompt=4, **DISAGGREGATED)
    with pytest.raises(ValueError, match=r"prompts_per_step=2 is not divisible by mesh.data × mesh.fsdp = 4"):
        _run(config)
