"""PPO trainer: targets and loss vs numpy references, reward normaliser, KL controller,
exact resume, end-to-end runs (reward model, shared critic, KL in loss) and learning."""

import dataclasses
import math
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, RewardModel, ValueModel, tiny_config
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.metrics import read_metrics
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import split_model
from jaxrl_llm.train.ppo import (
    LossOptions,
    PPOConfig,
    compute_ppo_targets,
    explained_variance,
    make_critic,
    normalize_scores,
    ppo_loss,
    train,
    update_running_moments,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
PROMPTS = [{"prompt": f"q{i}:"} for i in range(16)]
ALNUM = "0123456789abcdefghijklmnopqrstuvwxyz"


def count_reward(prompts, completions, **columns):
    """Toy reward: number of lowercase letters and digits in the completion."""
    return [float(sum(ch in ALNUM for ch in c)) for c in completions]


def tiny_policy(seed=0):
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed))


def base_config(tmp_path, name="run", **kw):
    """One set of shapes (N = 8 rows, P = 8, T = 8) shared by the tests: compiled once."""
    fields = dict(run=RunConfig(output_dir=str(tmp_path / name), total_steps=2, progress=False),
                  optim=OptimConfig(learning_rate=3e-3), prompts_per_step=4, samples_per_prompt=2,
                  max_prompt_len=8, max_new_tokens=8, ppo_epochs=2, minibatches=2)
    fields.update(kw)
    return PPOConfig(**fields)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(kl_kind="k4"), "kl_kind"), (dict(kl_schedule="cosine"), "kl_schedule"),
     (dict(kl_schedule="linear"), "kl_coef_final"), (dict(kl_schedule="adaptive", kl_coef=0.0), "adaptive"),
     (dict(prompts_per_step=3, minibatches=2), "divisible"), (dict(replay_rows=4), "replay_rows"),
     (dict(temperature=0.0), "temperature"), (dict(loss_agg="sum"), "loss_agg"), (dict(gamma=1.5), "gamma"),
     (dict(overlong_prompts="cut"), "overlong_prompts"), ({"kl_reward_placement": "seq"}, "kl_reward_placement"),
     ({"kl_reward_placement": "sequence", "kl_in_reward": False}, "kl_in_reward=True")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


def test_linear_kl_schedule():
    cfg = PPOConfig(run=RunConfig(total_steps=11), kl_coef=0.5, kl_schedule="linear", kl_coef_final=0.0)
    assert cfg.kl_coef_at(0) == 0.5 and cfg.kl_coef_at(10) == 0.0
    np.testing.assert_allclose(cfg.kl_coef_at(5), 0.25)


# ---------------------------------------------------------------- numpy references


def ref_targets(scores, logp, ref_logp, values, mask, beta, kind, gamma, lam, whiten, placement="token",
                token_scores=None):
    """Shaped rewards → GAE → whitening as plain loops from the papers' definitions.

    placement "token": r_t = −β·kl_t, r_last += score; "sequence": r_last = score − β·Σ kl_t.
    token_scores (multi-turn step rewards): r_t += token_scores_t on valid tokens.
    """
    n, t = logp.shape
    kl = np.zeros((n, t))
    rewards = np.zeros((n, t))
    adv = np.zeros((n, t))
    for b in range(n):
        valid = [i for i in range(t) if mask[b, i]]
        for i in valid:
            d = logp[b, i] - ref_logp[b, i]
            kl[b, i] = d if kind == "k1" else math.exp(-d) + d - 1.0
            rewards[b, i] = -beta * kl[b, i] if placement == "token" else 0.0
        if valid:
            rewards[b, valid[-1]] += scores[b] - (beta * kl[b].sum() if placement == "sequence" else 0.0)
        for i in valid:
            rewards[b, i] += 0.0 if token_scores is None else token_scores[b, i]
        next_v = next_a = 0.0
        for i in reversed(valid):  # holes are skipped: the recursion links valid tokens
            delta = rewards[b, i] + gamma * next_v - values[b, i]
            adv[b, i] = delta + gamma * lam * next_a
            next_v, next_a = values[b, i], adv[b, i]
    returns = np.where(mask > 0, adv + values, 0.0)
    if whiten:
        sel = adv[mask > 0]
        mean = sel.mean()
        var = ((sel - mean) ** 2).sum() / (len(sel) - 1)
        adv = np.where(mask > 0, (adv - mean) / math.sqrt(var + 1e-8), 0.0)
    return kl, rewards, adv, returns


def _random_rollout(seed=0, n=5, t=7):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2, 0.5, (n, t)).astype(np.float32)
    ref_logp = (logp + rng.normal(0, 0.3, (n, t))).astype(np.float32)
    values = rng.normal(0, 1, (n, t)).astype(np.float32)
    scores = rng.normal(0, 1, n).astype(np.float32)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]).astype(np.float32)
    mask[0, 2] = 0.0  # a hole inside a response
    return scores, logp, ref_logp, values, mask


@pytest.mark.parametrize("kind, whiten, placement", [("k1", True, "token"), ("k3", False, "token"),
                                                     ("k1", False, "sequence"), ("k3", True, "sequence")])
def test_targets_match_numpy_reference(kind, whiten, placement):
    scores, logp, ref_logp, values, mask = _random_rollout()
    mask[3] = 0.0  # an unscored row: nothing anywhere
    out = jax.jit(lambda *a: compute_ppo_targets(*a, beta=0.1, kl_kind=kind, gamma=0.9, lam=0.8, whiten=whiten,
                                                 kl_reward_placement=placement))(scores, logp, ref_logp, values, mask)
    kl, rewards, adv, returns = ref_targets(scores, logp, ref_logp, values, mask, 0.1, kind, 0.9, 0.8, whiten,
                                            placement)
    for name, expected in (("kl", kl), ("rewards", rewards), ("advantages", adv), ("returns", returns)):
        np.testing.assert_allclose(np.asarray(out[name]), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.all(np.asarray(out["rewards"])[mask == 0] == 0)


def test_sequence_kl_placement_rewards():
    scores, logp, ref_logp, values, mask = _random_rollout(seed=1, n=6, t=9)
    beta = 0.3
    tok, seq = (compute_ppo_targets(scores, logp, ref_logp, values, mask, beta=beta, whiten=False,
                                    kl_reward_placement=p) for p in ("token", "sequence"))
    kl = (logp - ref_logp) * mask
    last = np.array([np.flatnonzero(m).max() for m in mask])
    expected = np.zeros_like(kl)
    expected[np.arange(6), last] = scores - beta * kl.sum(1)  # zeros except at the last valid token
    np.testing.assert_allclose(np.asarray(seq["rewards"]), expected, rtol=1e-5, atol=1e-6)
    # the same total reward per response in both placements (the return at γ = 1)
    np.testing.assert_allclose(np.asarray(seq["rewards"]).sum(1), np.asarray(tok["rewards"]).sum(1), atol=1e-5)
    with pytest.raises(ValueError, match="kl_reward_placement"):
        compute_ppo_targets(scores, logp, ref_logp, values, mask, beta=beta, kl_reward_placement="sample")


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_sequence_placement_is_potential_shaping(lam):
    """A critic that subtracts the KL already spent (V_t − β·Σ_{u<t} kl_u) gives the
    sequence placement exactly the token placement's advantages (γ = 1, any λ)."""
    scores, logp, ref_logp, values, mask = _random_rollout(seed=2, n=6, t=9)
    mask[:, 4] = np.where(mask[:, 5] > 0, 0.0, mask[:, 4])  # holes as well
    beta = 0.5
    kl = (logp - ref_logp) * mask
    spent = np.cumsum(kl, axis=1) - kl  # Σ_{u<t} kl_u
    tok = compute_ppo_targets(scores, logp, ref_logp, values, mask, beta=beta, lam=lam, whiten=False)
    seq = compute_ppo_targets(scores, logp, ref_logp, (values - beta * spent) * mask, mask, beta=beta, lam=lam,
                              whiten=False, kl_reward_placement="sequence")
    np.testing.assert_allclose(np.asarray(seq["advantages"]), np.asarray(tok["advantages"]), atol=1e-5)


def _fixed_batch(policy, critic_values_fn, n=6, p=5, t=7, seed=0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 200, (n, p))
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, 3, n)[:, None]).astype(np.int32)  # left-aligned
    resp = rng.integers(1, 200, (n, t))
    mask = (np.arange(t)[None] < rng.integers(2, t + 1, n)[:, None]).astype(np.float32)
    tokens = np.concatenate([prompt * prompt_mask, resp * mask], 1).astype(np.int32)
    full_mask = np.concatenate([prompt_mask, mask], 1).astype(np.int32)
    logits, _ = policy(jnp.asarray(tokens), attention_mask=jnp.asarray(full_mask))
    logp_all = np.asarray(jax.nn.log_softmax(logits[:, p - 1 : -1]), np.float64)
    logp = np.take_along_axis(logp_all, resp[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    values = critic_values_fn(tokens, full_mask)[:, p - 1 : -1]
    batch = {
        "tokens": tokens, "full_mask": full_mask, "mask": mask,
        "old_logp": (logp + rng.normal(0, 0.15, logp.shape)).astype(np.float32),
        "old_values": (values + rng.normal(0, 0.3, values.shape)).astype(np.float32),
        "advantages": rng.normal(0, 1, (n, t)).astype(np.float32) * mask,
        "returns": rng.normal(0, 1, (n, t)).astype(np.float32) * mask,
        "ref_logp": (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32),
        "kl_coef": np.float32(0.2),
    }
    return batch, logp, entropy, values, p


def ref_loss(batch, logp, entropy, values, opts: LossOptions):
    """Token-mean PPO loss from the definitions (numpy, float64)."""
    m = batch["mask"]
    pg = np.zeros_like(logp)
    vf = np.zeros_like(logp)
    kl = np.zeros_like(logp)
    for b in range(m.shape[0]):
        for t in range(m.shape[1]):
            a = batch["advantages"][b, t]
            rho = math.exp(logp[b, t] - batch["old_logp"][b, t])
            pg[b, t] = max(-a * rho, -a * min(max(rho, 1 - opts.clip_low), 1 + opts.clip_high))
            ov, ret = batch["old_values"][b, t], batch["returns"][b, t]
            clipped = ov + min(max(values[b, t] - ov, -opts.value_clip), opts.value_clip)
            vf[b, t] = 0.5 * max((values[b, t] - ret) ** 2, (clipped - ret) ** 2)
            kl[b, t] = logp[b, t] - batch["ref_logp"][b, t]
    mean = lambda x: (x * m).sum() / m.sum()
    loss = mean(pg) + opts.vf_coef * mean(vf) - opts.entropy_coef * mean(entropy)
    if not opts.kl_in_reward:
        loss += float(batch["kl_coef"]) * mean(kl)
    return loss, mean(pg), mean(vf)


@pytest.mark.parametrize("shared, kl_in_reward", [(False, True), (True, False)])
def test_ppo_loss_matches_numpy_reference(shared, kl_in_reward):
    policy = tiny_policy(0)
    psplit = split_model(policy)
    opts = LossOptions(prompt_len=5, vf_coef=0.5, entropy_coef=0.01, kl_in_reward=kl_in_reward, chunk_size=8)
    if shared:
        head = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (32, 1))
        values_fn = lambda tok, fm: np.asarray(
            policy(jnp.asarray(tok), attention_mask=jnp.asarray(fm), return_hidden=True)[0] @ head)[..., 0]
        params, graphs, rests = {"policy": psplit.params, "critic": {"value_head": head}}, (psplit.graphdef, None), (psplit.rest, None)
    else:
        critic = make_critic(policy)
        critic.score[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (32, 1))
        csplit = split_model(critic)
        values_fn = lambda tok, fm: np.asarray(critic(jnp.asarray(tok), attention_mask=jnp.asarray(fm)))
        params, graphs, rests = ({"policy": psplit.params, "critic": csplit.params}, (psplit.graphdef, csplit.graphdef),
                                 (psplit.rest, csplit.rest))
    batch, logp, entropy, values, _ = _fixed_batch(policy, values_fn)
    loss, metrics = jax.jit(lambda prm, b: ppo_loss(prm, b, rests, graphs, opts))(params, batch)
    expected, pg, vf = ref_loss(batch, logp, entropy, values, opts)
    np.testing.assert_allclose(float(metrics["pg_loss"]), pg, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(metrics["vf_loss"]), vf, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4, atol=2e-5)


def test_critic_starts_from_policy_backbone():
    policy = tiny_policy(3)
    critic = make_critic(policy)
    chex.assert_trees_all_equal(nnx.state(policy.model, nnx.Param), nnx.state(critic.model, nnx.Param))
    assert float(jnp.abs(critic.score[...]).max()) == 0.0


def test_running_moments_and_normalisation():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, k) for k in (5, 1, 9)]
    stats = {k: np.zeros((), np.float32) for k in ("count", "mean", "m2")}
    for x in batches:
        stats = update_running_moments(stats, x)
    allx = np.concatenate(batches)
    np.testing.assert_allclose(float(stats["count"]), allx.size)
    np.testing.assert_allclose(float(stats["mean"]), allx.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["m2"]) / (allx.size - 1), allx.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(normalize_scores(allx, stats), (allx - allx.mean()) / allx.std(ddof=1), rtol=1e-4)


def test_explained_variance():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 5))
    m = np.ones_like(r)
    assert explained_variance(r, r, m) == 1.0
    assert abs(explained_variance(np.zeros_like(r) + r.mean(), r, m)) < 1e-9


# ---------------------------------------------------------------- end to end


def test_end_to_end_metrics(tmp_path):
    config = base_config(tmp_path)
    result = train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=count_reward)
    assert len(result.history) == 2
    for row in result.history:
        for key in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "explained_variance",
                    "response_length_mean", "pg_loss", "vf_loss", "grad_norm"):
            assert np.isfinite(row[key]), key
    assert isinstance(result.critic, ValueModel)
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_sequence_kl_placement_end_to_end(tmp_path):
    config = base_config(tmp_path, kl_reward_placement="sequence", kl_coef=0.5)
    h = train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=count_reward).history
    for row in h:
        assert np.isfinite(row["loss"]) and np.isfinite(row["vf_loss"])
        # the KL still reaches the reward, summed: non-score reward = −β · (sequence KL)
        np.testing.assert_allclose(row["non_score_reward"], -0.5 * row["kl"], rtol=1e-4, atol=1e-5)


def test_reward_model_shared_critic_kl_in_loss(tmp_path):
    rm = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(5))
    config = base_config(tmp_path, shared_critic=True, kl_in_reward=False, kl_kind="k3", reward_norm=True,
                         reward_clip=3.0, missing_eos_penalty=1.0)
    result = train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS, reward_model=rm)
    for row in result.history:
        assert np.isfinite(row["loss"]) and np.isfinite(row["kl_loss"]) and abs(row["score"]) <= 3.0
        assert row["non_score_reward"] == 0.0  # the KL is in the loss, not the reward
    assert result.critic.shape == (32, 1)


def test_adaptive_beta_moves_toward_target(tmp_path):
    # target far below the measured KL → β grows; far above → β shrinks; each step
    # follows the Ziegler et al. update from the logged KL. The k3 estimator (≥ 0): the
    # sign of k1's sample mean over these 64 tokens is noise (measured −0.03 and −0.24 at
    # steps 1 and 3 of one run), and the sign alone decides the controller's direction.
    # Step 0 always shrinks β (policy = reference: KL 0); 5 steps leave room for one more.
    for target, grows in ((1e-4, True), (1e3, False)):
        config = base_config(tmp_path, name=f"t{target}", kl_schedule="adaptive", kl_coef=0.1, kl_target=target,
                             kl_horizon=40.0, kl_kind="k3",
                             run=RunConfig(output_dir=str(tmp_path / f"t{target}"), total_steps=5, progress=False))
        result = train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=count_reward)
        h = result.history
        for prev, nxt in zip(h, h[1:]):
            err = np.clip(prev["kl"] / target - 1.0, -0.2, 0.2)
            np.testing.assert_allclose(nxt["kl_coef"], prev["kl_coef"] * (1 + err * 8 / 40.0), rtol=1e-5)
        if grows:
            assert result.kl_coef > 0.1 and h[-1]["kl"] > target
        else:
            assert result.kl_coef < 0.1


class Kill(BaseException):
    """Stands in for the process being killed (not caught by the reward wrapper)."""


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    kw = dict(kl_schedule="adaptive", kl_coef=0.2, kl_target=0.05, kl_horizon=50.0, reward_norm=True,
              replay_capacity=16, replay_rows=4)
    run = lambda name, **r: RunConfig(output_dir=str(tmp_path / name), total_steps=5, checkpoint_every=2,
                                      progress=False, **r)
    full = train(base_config(tmp_path, run=run("a"), **kw), policy=tiny_policy(), tokenizer=CharTokenizer(),
                 prompts=PROMPTS, reward_fn=count_reward)

    calls = []

    def killed_at_step_3(prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 4:
            raise Kill
        return count_reward(prompts, completions)

    with pytest.raises(Kill):
        train(base_config(tmp_path, run=run("b"), **kw), policy=tiny_policy(), tokenizer=CharTokenizer(),
              prompts=PROMPTS, reward_fn=killed_at_step_3)
    deadline = time.time() + 60  # the step-2 checkpoint is written asynchronously
    while not (tmp_path / "b" / "checkpoints" / "2").exists() and time.time() < deadline:
        time.sleep(0.2)
    resumed = train(base_config(tmp_path, run=run("b", resume=True), **kw), policy=tiny_policy(),
                    tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=count_reward)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    a, b = strip(read_metrics(tmp_path / "a" / "metrics.jsonl")), strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(5))
    assert a == b  # same metrics step for step: β controller, normaliser, replay and data restored
    assert len({r["kl_coef"] for r in a}) == 5 and a[-1]["replay_rows"] == 4
    chex.assert_trees_all_equal(nnx.state(full.model, nnx.Param), nnx.state(resumed.model, nnx.Param))
    chex.assert_trees_all_equal(nnx.state(full.critic, nnx.Param), nnx.state(resumed.critic, nnx.Param))
    assert full.kl_coef == resumed.kl_coef


def test_bad_inputs(tmp_path):
    config = base_config(tmp_path)
    tok = CharTokenizer()
    common = dict(policy=tiny_policy(), tokenizer=tok, reward_fn=count_reward)
    with pytest.raises(ValueError, match="dataset is empty"):
        train(config, prompts=[], **common)
    with pytest.raises(ValueError, match=r"RL prompt records must be one of: \{prompt\} \| \{messages\}; record 1 has fields"):
        train(config, prompts=[{"prompt": "a"}, {"question": "b"}], **common)
    with pytest.raises(ValueError, match="0 tokens"):
        train(config, prompts=[{"prompt": ""}] * 4, **common)
    with pytest.raises(ValueError, match="max_prompt_len"):
        train(config, prompts=[{"prompt": "a prompt far longer than eight tokens"}] * 4, **common)
    with pytest.raises(ValueError, match="needs a reward"):
        train(config, policy=tiny_policy(), tokenizer=tok, prompts=PROMPTS)
    with pytest.raises(ValueError, match="shared_critic"):
        train(dataclasses.replace(config, shared_critic=True), prompts=PROMPTS, critic=make_critic(tiny_policy()), **common)
    with pytest.raises(ValueError, match="pool"):
        train(config, prompts=PROMPTS, critic=RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), **common)
    # over-long prompts can be truncated instead (keeps the end of the prompt)
    long = dataclasses.replace(config, overlong_prompts="truncate_left",
                               run=dataclasses.replace(config.run, total_steps=1, output_dir=str(tmp_path / "long")))
    train(long, prompts=[{"prompt": "a prompt far longer than eight tokens"}] * 4, **common)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    class NoPad(CharTokenizer):
        def __init__(self):
            super().__init__()
            self.pad_token_id = None

    config = base_config(tmp_path, run=RunConfig(output_dir=str(tmp_path / "nopad"), total_steps=1, progress=False))
    result = train(config, policy=tiny_policy(), tokenizer=NoPad(), prompts=PROMPTS, reward_fn=count_reward)
    assert np.isfinite(result.history[0]["loss"])

    class NoEos(CharTokenizer):
        def __init__(self):
            super().__init__()
            self.eos_token_id = None

    with pytest.raises(ValueError, match="eos_token_id"):
        train(config, policy=tiny_policy(), tokenizer=NoEos(), prompts=PROMPTS, reward_fn=count_reward)


def test_unscored_samples_are_left_out(tmp_path):
    def half(prompts, completions, **columns):
        return [None if i % 2 else float(len(c)) for i, c in enumerate(completions)]

    config = base_config(tmp_path, run=RunConfig(output_dir=str(tmp_path / "half"), total_steps=1, progress=False))
    row = train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS, reward_fn=half).history[0]
    assert row["reward_failures"] == 4 and np.isfinite(row["loss"])


# ---------------------------------------------------------------- learning


@pytest.mark.slow
def test_ppo_increases_reward_and_beta_bounds_kl(tmp_path):
    """Holds with margin on seeds 0 / 1 / 2 (policy init and run seed; seed 0 with
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 same as seed 0 to 5 digits): reward gain 4.68 / 3.15 /
    4.73 (> 1.5), max KL 19.0 / 12.8 / 21.5 (< 40), KL(β=1) / KL(β=0.01) 0.034 / 0.058 /
    0.038 (< 0.25)."""
    out = {}
    for beta in (0.01, 1.0):
        config = base_config(tmp_path, kl_coef=beta,
                             run=RunConfig(output_dir=str(tmp_path / f"b{beta}"), total_steps=30, progress=False))
        h = train(config, policy=tiny_policy(), tokenizer=CharTokenizer(), prompts=PROMPTS,
                  reward_fn=count_reward).history
        out[beta] = (np.mean([r["reward"] for r in h[:5]]), np.mean([r["reward"] for r in h[-5:]]),
                     np.mean([r["kl"] for r in h[-5:]]), max(r["kl"] for r in h))
    first, last, kl_small, kl_max = out[0.01]
    assert last > first + 1.5  # mean reward rises (≈1 → ≈5 of at most 8)
    assert kl_max < 40.0  # KL grows but stays bounded (nats per 8-token response)
    assert out[1.0][2] < 0.25 * kl_small  # a large β keeps the policy near the reference
