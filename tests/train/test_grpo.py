"""GRPO-family trainer: presets, per-preset loss vs a numpy reference, dynamic sampling,
routing replay, and short end-to-end runs."""

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset
from jaxrl_llm.rollout.sampler import Rollout, generate
from jaxrl_llm.train.grpo import (
    PRESETS,
    GRPOConfig,
    ScoredBatch,
    _concat,
    _make_logprob_fn,
    _policy_loss,
    _Static,
    compute_advantages,
    informative_groups,
    train,
)
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import split_model
from tests.ops.test_masked import ref_aggregate
from tests.ops.test_policy_losses import ref_ppo

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def test_presets_set_the_published_recipes():
    assert GRPOConfig.preset("grpo").advantage == "group" and GRPOConfig.preset("grpo").kl_coef == 0.04
    dr = GRPOConfig.preset("dr_grpo")
    assert dr.advantage == "none" and dr.loss_agg == "seq_mean_token_sum_norm" and dr.kl_coef == 0
    dapo = GRPOConfig.preset("dapo", max_new_tokens=100)
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg) == (0.2, 0.28, "token_mean")
    assert dapo.dynamic_sampling and dapo.overlong_buffer == 20 and dapo.kl_coef == 0
    gspo = GRPOConfig.preset("gspo")
    assert gspo.policy_loss == "gspo" and (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)
    assert GRPOConfig.preset("rloo").advantage == "rloo"
    assert GRPOConfig.preset("grpo", kl_coef=0.0).kl_coef == 0.0  # overrides win
    with pytest.raises(ValueError, match="preset must be one of"):
        GRPOConfig.preset("ppo")


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(group_size=1), "group_size"), (dict(advantage="std"), "advantage"), (dict(loss_agg="sum"), "loss_agg"),
     (dict(prompts_per_step=3, group_size=3, minibatches=2), "divisible"), (dict(temperature=0.0), "temperature")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


def ref_advantages(scores, valid, g, kind):
    out = []
    for start in range(0, len(scores), g):
        grp = [scores[i] for i in range(start, start + g) if valid[i]]
        fill = sum(grp) / len(grp) if grp else 0.0
        s = [scores[i] if valid[i] else fill for i in range(start, start + g)]
        mean = sum(s) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (g - 1))
        for i, x in enumerate(s):
            if max(s) == min(s):
                out.append(0.0)
            elif kind == "group":
                out.append((x - mean) / (std + 1e-6))
            elif kind == "none":
                out.append(x - mean)
            else:  # rloo
                out.append(x - (sum(s) - x) / (g - 1))
    return np.array(out)


@pytest.mark.parametrize("kind", ["group", "none", "rloo"])
def test_compute_advantages_with_unscored_samples(kind):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 2, 12).astype(np.float32)
    valid = np.ones(12, bool)
    valid[[1, 6]] = False
    out = compute_advantages(scores, valid, GRPOConfig(group_size=4, advantage=kind))
    np.testing.assert_allclose(out, ref_advantages(scores, valid, 4, kind), rtol=1e-5, atol=1e-6)


def _fixed_batch(model, n=6, p=5, t=7, seed=0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 200, (n, p))
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, 3, n)[:, None]).astype(np.int32)  # left padded
    resp = rng.integers(1, 200, (n, t))
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    tokens = np.concatenate([prompt * prompt_mask, resp * mask], 1).astype(np.int32)
    full_mask = np.concatenate([prompt_mask, mask], 1).astype(np.int32)
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(full_mask))
    logp_all = np.asarray(jax.nn.log_softmax(logits[:, p - 1 : -1]), np.float64)
    logp = np.take_along_axis(logp_all, resp[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    old = (logp + rng.normal(0, 0.15, logp.shape)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)
    adv = rng.normal(0, 1, n).astype(np.float32)
    batch = {
        "tokens": jnp.asarray(tokens), "full_mask": jnp.asarray(full_mask), "mask": jnp.asarray(mask),
        "advantages": jnp.asarray(adv), "tis_weight": jnp.ones((n, t)), "old_logp": jnp.asarray(old),
        "ref_logp": jnp.asarray(ref), "routing": None,
    }
    return batch, logp, entropy, old, ref, adv, mask, p


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loss_matches_numpy_reference(preset):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    config = GRPOConfig.preset(preset, max_new_tokens=7, kl_coef=0.1 if preset == "grpo" else 0.0,
                               entropy_coef=0.01, clip_low=0.2 if preset != "gspo" else 0.05,
                               clip_high=0.28 if preset == "dapo" else (0.2 if preset != "gspo" else 0.05))
    batch, logp, entropy, old, ref, adv, mask, p = _fixed_batch(model)
    split = split_model(model)
    static = _Static(p, config, has_old=True, has_ref=config.kl_coef > 0, replay=False, train_router=True)
    loss, metrics = jax.jit(lambda prm, b: _policy_loss(prm, b, split, static))(split.params, batch)

    # numpy reference, from the paper definitions, on the naive log-probs
    if config.policy_loss == "ppo":
        expected = ref_ppo(logp, old, adv, mask, config.clip_low, config.clip_high, None, config.loss_agg)[0] \
            if config.loss_agg != "seq_mean_token_sum_norm" else None
        if expected is None:  # Dr. GRPO: constant normaliser T
            per_tok = np.zeros_like(logp)
            for b in range(len(adv)):
                for t in range(logp.shape[1]):
                    rho = math.exp(logp[b, t] - old[b, t])
                    per_tok[b, t] = max(-adv[b] * rho, -adv[b] * min(max(rho, 1 - config.clip_low), 1 + config.clip_high))
            expected = ref_aggregate(per_tok, mask, "seq_mean_token_sum_norm", config.max_new_tokens)
    else:
        per_seq = []
        for b in range(len(adv)):
            valid = [t for t in range(logp.shape[1]) if mask[b, t]]
            s = math.exp(sum(logp[b, t] - old[b, t] for t in valid) / len(valid))
            per_seq.append(max(-adv[b] * s, -adv[b] * min(max(s, 1 - config.clip_low), 1 + config.clip_high)))
        expected = float(np.mean(per_seq))
    if config.kl_coef:
        k3 = np.exp(ref - logp) - (ref - logp) - 1
        expected += config.kl_coef * ref_aggregate(k3, mask, config.loss_agg, config.max_new_tokens)
    expected -= config.entropy_coef * ref_aggregate(entropy, mask, config.loss_agg, config.max_new_tokens)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4, atol=2e-5)
    assert 0.0 <= float(metrics["clipfrac"]) <= 1.0


def test_informative_groups():
    scores = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5], np.float32)
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    np.testing.assert_array_equal(informative_groups(scores, valid, 3), [False, True, False])
    # an unscored sample does not make a group informative
    valid2 = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1], bool)
    scores2 = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0], np.float32)
    np.testing.assert_array_equal(informative_groups(scores2, valid2, 3), [False, False, False])


def _fake_scored(scores, g, seed):
    n = len(scores)
    rng = np.random.default_rng(seed)
    rollout = Rollout(
        prompt_tokens=jnp.asarray(rng.integers(0, 9, (n, 2))), prompt_mask=jnp.ones((n, 2), jnp.int32),
        tokens=jnp.asarray(rng.integers(0, 9, (n, 3))), logprobs=jnp.zeros((n, 3)), mask=jnp.ones((n, 3), jnp.int32),
        lengths=jnp.full((n,), 3), finished=jnp.ones((n,), bool),
    )
    return ScoredBatch(rollout, np.asarray(scores, np.float32), np.asarray(scores, np.float32), np.ones(n, bool), np.arange(n // g) + 100 * seed)


def test_dynamic_sampling_concat_keeps_only_informative_groups():
    g = 2
    r0 = _fake_scored([1, 1, 0, 1, 0, 0], g, 0)  # groups: degenerate, informative, degenerate
    r1 = _fake_scored([0, 1, 1, 1, 1, 0], g, 1)  # informative, degenerate, informative
    merged, filled = _concat([r0, r1], g, want_groups=3)
    assert int(filled) == 3
    np.testing.assert_array_equal(merged.prompt_ids, [1, 100, 102])
    assert informative_groups(merged.scores, merged.valid, g).all()
    np.testing.assert_array_equal(merged.rollout.tokens[:2], r0.rollout.tokens[2:4])
    short, filled = _concat([r0], g, want_groups=3)  # only one informative group: pad masked
    assert int(filled) == 1 and short.valid.tolist() == [True, True, False, False, False, False]
    assert short.rollout.tokens.shape == (6, 3)


@pytest.fixture(scope="module")
def char_setup():
    tok = CharTokenizer()
    data = make_arithmetic_dataset(32, 0, max_operand=9)
    return tok, data


def _run_config(tmp_path, preset, **kw):
    base = dict(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False),
                optim=OptimConfig(learning_rate=1e-3), prompts_per_step=2, group_size=4, max_prompt_len=8, max_new_tokens=6)
    base.update(kw)
    return GRPOConfig.preset(preset, **base)


def test_dynamic_sampling_stops_at_cap_when_every_group_is_degenerate(tmp_path, char_setup, caplog):
    tok, data = char_setup
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    config = _run_config(tmp_path, "dapo", max_sampling_rounds=3, overlong_buffer=0)
    with caplog.at_level(logging.WARNING):
        result = train(config, policy=model, tokenizer=tok, prompts=data, reward_fn=lambda p, c, **k: [1.0] * len(c))
    assert "max_sampling_rounds=3" in caplog.text
    for row in result.history:
        assert row["sampling_rounds"] == 3 and row["generations"] == 3 * 8 and row["skipped_no_signal"] == 1
        assert row["informative_groups_after"] == 0.0
        # every sample scored 1.0: the headline says so (all rounds); no group was kept
        assert row["reward_mean"] == 1.0 and row["accuracy"] == 1.0 and row["reward_std"] == 0.0
        assert math.isnan(row["kept_reward_mean"]) and math.isnan(row["kept_accuracy"])
    after = jax.tree.map(np.asarray, nnx.state(result.model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # no signal → no update at all


def test_routing_replay_reproduces_rollout_logprobs():
    model = CausalLM(tiny_config("qwen3_moe", **TINY), rngs=nnx.Rngs(3))
    prompts = np.array([[10, 11, 12, 13], [14, 15, 0, 0]])  # right-padded, ragged
    rollout = generate(model, prompts, (prompts > 0).astype(np.int32), max_new_tokens=6, num_samples=2,
                       rng=jax.random.PRNGKey(0), return_raw_logprobs=True, prompt_bucket=0)
    assert rollout.routing is not None and rollout.routing.shape[1:3] == (4, 10)
    tokens, full_mask = rollout.full_tokens()
    recorded = rollout.full_routing()
    split = split_model(model)
    config = GRPOConfig(max_new_tokens=6)
    replay = _make_logprob_fn(split, _Static(4, config, False, False, replay=True, train_router=True))
    logp, used = replay(split.params, tokens, full_mask, recorded)
    m = np.asarray(rollout.mask)
    np.testing.assert_allclose(np.asarray(logp) * m, np.asarray(rollout.raw_logprobs) * m, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(used), np.asarray(recorded))
    # at identical params the natural routing of the training forward equals the record on
    # every real token (prompt positions included: the record is aligned like the tokens)
    same_params = _make_logprob_fn(split, _Static(4, config, False, False, replay=False, train_router=True))
    _, natural = same_params(split.params, tokens, full_mask, None)
    valid = np.asarray(full_mask)[None, :, :, None] > 0
    np.testing.assert_array_equal(np.sort(np.asarray(natural), -1) * valid, np.sort(np.asarray(recorded), -1) * valid)
    # perturb the router: natural routing changes for some tokens, replay keeps the recorded one
    noisy = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(1), x.shape) if "router" in jax.tree_util.keystr(path) else x,
        split.params)
    free = _make_logprob_fn(split, _Static(4, config, False, False, replay=False, train_router=True))
    _, natural = free(noisy, tokens, full_mask, None)
    _, replayed = replay(noisy, tokens, full_mask, recorded)
    assert np.any((np.asarray(natural) != np.asarray(recorded)) & valid)
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(recorded))


@pytest.mark.parametrize("replay", [True, False])
def test_moe_training_reports_routing_change(tmp_path, char_setup, replay):
    tok, data = char_setup
    model = CausalLM(tiny_config("qwen3_moe", **TINY), rngs=nnx.Rngs(0))
    config = _run_config(tmp_path, "grpo", num_inner_updates=3, routing_replay=replay, router_z_coef=1e-3,
                         optim=OptimConfig(learning_rate=3e-2))
    reward = lambda p, c, **k: [float(len(x) % 2) for x in c]
    result = train(config, policy=model, tokenizer=tok, prompts=data, reward_fn=reward)
    changes = [row["routing_change"] for row in result.history]
    assert all(row["router_z_loss"] > 0 for row in result.history)  # the router regulariser is on
    if replay:
        assert all(c == 0.0 for c in changes)
    else:
        assert max(changes) > 0.0


def test_freeze_router_keeps_router_weights(tmp_path, char_setup):
    tok, data = char_setup
    model = CausalLM(tiny_config("qwen3_moe", **TINY), rngs=nnx.Rngs(0))
    routers = lambda m: [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param)) if "router" in jax.tree_util.keystr(p)]
    before = routers(model)
    config = _run_config(tmp_path, "grpo", freeze_router=True, optim=OptimConfig(learning_rate=1e-2, weight_decay=0.0))
    result = train(config, policy=model, tokenizer=tok, prompts=data, reward_fn=lambda p, c, **k: [float(len(x) % 2) for x in c])
    for a, b in zip(before, routers(result.model)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs(tmp_path, char_setup):
    tok, data = char_setup
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    config = _run_config(tmp_path, "grpo")
    with pytest.raises(ValueError, match="dataset is empty"):
        train(config, policy=model, tokenizer=tok, prompts=[], reward_fn=lambda p, c, **k: [0.0] * len(c))
    with pytest.raises(ValueError, match=r"RL prompt records must be one of: \{prompt\} \| \{messages\}; record 1 has fields"):
        train(config, policy=model, tokenizer=tok, prompts=[{"prompt": "1+1="}, {"question": "x"}], reward_fn=lambda p, c, **k: [0.0] * len(c))
    with pytest.raises(ValueError, match="max_prompt_len"):
        train(config, policy=model, tokenizer=tok, prompts=[{"prompt": "123456789+1="}], reward_fn=lambda p, c, **k: [0.0] * len(c))


def test_failing_reward_samples_are_excluded_not_fatal(tmp_path, char_setup):
    tok, data = char_setup
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))

    def flaky(prompts, completions, **kw):
        out = []
        for i, c in enumerate(completions):
            if i % 3 == 0:
                out.append(None)
            elif i % 3 == 1:
                out.append(float("nan"))
            else:
                out.append(float(len(c) % 2))
        return out

    # 6 of 8 unscored is above the default health limit (0.5); this test is about exclusion
    config = dataclasses.replace(_run_config(tmp_path, "grpo"), max_unscored_frac=1.0)
    result = train(config, policy=model, tokenizer=tok, prompts=data, reward_fn=flaky)
    for row in result.history:
        assert row["reward_failures"] == 6  # 3 None + 3 NaN of 8
        assert row["reward_unscored_frac"] == 0.75
        assert np.isfinite(row["loss"])


def test_rollout_correction_in_the_trainer(tmp_path, char_setup):
    """TIS / MIS options reach the update: on-policy sampling gives ratios ≈ 1 (nothing
    rejected by a 2× band); a band narrower than float noise rejects tokens, and those
    leave the loss."""
    tok, data = char_setup
    reward = lambda p, c, **k: [float(len(x) % 2) for x in c]  # noqa: E731
    wide = _run_config(tmp_path / "wide", "grpo", tis_cap=2.0, tis_mode="mask", tis_level="geometric", tis_veto=1e-4)
    rows = train(wide, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), tokenizer=tok, prompts=data,
                 reward_fn=reward).history
    for row in rows:
        assert abs(row["is_mean"] - 1) < 1e-3 and row["is_masked_fraction"] == 0 and abs(row["mismatch_kl"]) < 1e-3
    narrow = _run_config(tmp_path / "narrow", "grpo", tis_cap=1 + 1e-7, tis_lower=1 - 1e-7, tis_mode="mask")
    rows = train(narrow, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), tokenizer=tok,
                 prompts=data, reward_fn=reward).history
    assert any(row["is_masked_fraction"] > 0 for row in rows)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tis_mode="mask"), r"tis_mode='mask' need tis_cap"),
    (dict(tis_cap=2.0, tis_level="batch"), "tis_level must be one of"),
    (dict(tis_cap=2.0, tis_lower=0.5), "tis_lower=0.5 is a rejection bound"),
    (dict(tis_cap=1.0, tis_mode="mask"), "tis_lower must be < tis_cap=1.0"),
    (dict(tis_cap=2.0, tis_veto=1.5), "tis_veto must be in"),
])
def test_rollout_correction_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)
