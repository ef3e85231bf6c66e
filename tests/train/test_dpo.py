"""DPO-family trainer: closed-form gradient at the reference, every loss kind against a
naive log-prob reference, cached vs on-the-fly reference, data edge cases, exact resume,
and a short learning run."""

import dataclasses
import json
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.train import dpo
from jaxrl_llm.train.dpo import (
    DPOConfig,
    batch_arrays,
    dpo_forward_loss,
    dpo_objective,
    evaluate,
    make_preference_loader,
    train,
)
from jaxrl_llm.train.loop import RunConfig, TrainLoop
from jaxrl_llm.train.metrics import read_metrics
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import split_model

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TIMING_KEYS = ("tokens_per_s",)


def _model(seed=0):
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed))


def synthetic_pairs(n, seed):
    """chosen: a lowercase word; rejected: the same word in upper case."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(list("abcdefgh"), rng.integers(2, 6)))
        out.append({"prompt": f"q{rng.integers(10)}:", "chosen": word, "rejected": word.upper()})
    return out


def _config(tmp_path, **kw):
    base = dict(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False),
                optim=OptimConfig(learning_rate=1e-3), beta=0.1, batch_size=4, max_len=16)
    base.update(kw)
    return DPOConfig(**base)


def _fixed_batch(config, n=4, seed=0):
    loader, _ = make_preference_loader(config, CharTokenizer(), synthetic_pairs(n, seed), shuffle=False)
    return batch_arrays(next(loader))


def naive_sequence_logprobs(model, batch, length_normalize=False):
    """Full logits → log_softmax → gather → masked sum, in float64 numpy."""
    logits = model(batch["tokens"], attention_mask=batch["attention_mask"])[0]
    logp_all = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1))
    targets = np.asarray(batch["tokens"])[:, 1:]
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    mask = np.asarray(batch["mask"])[:, 1:]
    sums = (logp * mask).sum(-1)
    if length_normalize:
        sums = sums / mask.sum(-1)
    return sums, logp, mask


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_kind="dpo"), "loss_kind"), (dict(beta=0.0), "beta"), (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(loss_kind="ipo", label_smoothing=0.1), "label_smoothing"), (dict(sft_weight=-1.0), "sft_weight"),
    (dict(reference_free=True, precompute_reference=True), "reference_free"), (dict(overlong="cut"), "overlong"),
    (dict(max_len=1), "max_len"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kwargs)


# ---------------------------------------------------------------- gradient at the reference


def test_gradient_at_reference_is_beta_half_logprob_difference(tmp_path):
    """At π = π_ref, Δ = 0 and ∂L/∂θ = −β·σ(0)·mean_b ∇(log π(c_b) − log π(r_b))."""
    config = _config(tmp_path, beta=0.5)
    model = _model()
    batch = _fixed_batch(config)
    split = split_model(model)
    b = batch["tokens"].shape[0] // 2
    ref_sums = jnp.asarray(naive_sequence_logprobs(model, batch)[0], jnp.float32)

    # d loss / d sequence log-probs: −β/2 / B on chosen, +β/2 / B on rejected
    lengths = jnp.sum(batch["mask"][:, 1:], -1)
    g = jax.jit(jax.grad(lambda s: dpo_objective(s, ref_sums, lengths, config)[0]))(ref_sums)
    np.testing.assert_allclose(g, np.r_[np.full(b, -0.25 / b), np.full(b, 0.25 / b)], rtol=1e-6)

    # parameter gradient of the trainer's loss vs the closed form on naive log-probs
    grads = jax.jit(jax.grad(lambda p: dpo_forward_loss(split.merge(p), batch, ref_sums, config)[0]))(split.params)

    def naive_margin(p):
        logits = split.merge(p)(batch["tokens"], attention_mask=batch["attention_mask"])[0][:, :-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], -1)[..., 0]
        sums = jnp.sum(logp * batch["mask"][:, 1:], -1)
        return jnp.mean(sums[:b] - sums[b:])

    expected = jax.tree.map(lambda x: -config.beta * 0.5 * x, jax.jit(jax.grad(naive_margin))(split.params))
    chex.assert_trees_all_close(grads, expected, rtol=2e-4, atol=1e-7)

    # one small SGD step raises chosen and lowers rejected log-probs
    stepped = jax.tree.map(lambda p, d: p - 1e-2 * d, split.params, grads)
    before = naive_sequence_logprobs(model, batch)[0]
    after = naive_sequence_logprobs(split.merge(stepped), batch)[0]
    assert np.mean(after[:b] - before[:b]) > 0 and np.mean(after[b:] - before[b:]) < 0


# ---------------------------------------------------------------- loss kinds vs naive


@pytest.mark.parametrize("kw", [
    dict(loss_kind="sigmoid"), dict(loss_kind="sigmoid", label_smoothing=0.1), dict(loss_kind="robust", label_smoothing=0.1),
    dict(loss_kind="ipo"), dict(loss_kind="hinge"), dict(loss_kind="sigmoid", length_normalize=True),
    dict(loss_kind="sigmoid", sft_weight=0.7), dict(loss_kind="sigmoid", reference_free=True, length_normalize=True),
], ids=["dpo", "cdpo", "robust", "ipo", "hinge", "length_norm", "rpo", "simpo_like"])
def test_loss_kinds_match_ops_on_naive_logprobs(tmp_path, kw):
    config = _config(tmp_path, beta=0.3, logprob_chunk_size=7, **kw)
    policy, reference = _model(0), _model(1)
    batch = _fixed_batch(config, n=4, seed=3)
    b = batch["tokens"].shape[0] // 2
    split = split_model(policy)
    ref_sums = jnp.asarray(naive_sequence_logprobs(reference, batch)[0], jnp.float32)
    loss, metrics = jax.jit(lambda p: dpo_forward_loss(split.merge(p), batch, ref_sums, config))(split.params)

    pi, logp, mask = naive_sequence_logprobs(policy, batch, config.length_normalize)
    ref = np.zeros_like(pi) if config.reference_free else naive_sequence_logprobs(reference, batch, config.length_normalize)[0]
    expected, exp_metrics = ops.dpo_loss(pi[:b], pi[b:], ref[:b], ref[b:], beta=config.beta, kind=config.loss_kind,
                                         label_smoothing=config.label_smoothing)
    expected = float(expected)
    if config.sft_weight:
        expected += config.sft_weight * -(logp[:b] * mask[:b]).sum() / mask[:b].sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4, atol=1e-6)
    for key in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        np.testing.assert_allclose(float(metrics[key]), float(exp_metrics[key]), rtol=1e-4, atol=1e-6)
    raw_pi = naive_sequence_logprobs(policy, batch)[0]
    raw_ref = np.zeros_like(raw_pi) if config.reference_free else naive_sequence_logprobs(reference, batch)[0]
    kl = (raw_pi[:b] - raw_ref[:b]).sum() / mask[:b].sum()
    np.testing.assert_allclose(float(metrics["kl_chosen"]), kl, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- data


def test_bad_and_edge_records(tmp_path, caplog):
    tok = CharTokenizer()
    config = _config(tmp_path, batch_size=2, max_len=12)
    records = [
        {"prompt": "p:", "chosen": "same", "rejected": "same"},                  # identical → dropped
        {"prompt": "p:", "chosen": "", "rejected": "bad"},                       # empty response: eos only
        {"prompt": "p:", "chosen": "abcdefghijklmnop", "rejected": "zz"},        # overlong → truncated
        {"prompt": "p:", "chosen": "tie1", "rejected": "tie2", "label": 0.5},    # tie → dropped
        {"prompt": "p:", "chosen": "worse", "rejected": "better", "label": 0.0},  # swapped
        {"prompt": "p:", "responses": ["a", "b", "c"], "scores": [3, 1, 2]},     # k-wise → 3 pairs
    ]
    with caplog.at_level(logging.WARNING):
        loader, stats = make_preference_loader(config, tok, records, shuffle=False)
    assert "identical" in caplog.text and "tied" in caplog.text
    assert (stats.records, stats.pairs, stats.ties_dropped, stats.swapped) == (6, 7, 1, 1)
    assert (stats.identical_dropped, stats.overlong_truncated, stats.overlong_dropped, stats.kept) == (1, 1, 0, 6)
    by_chosen = {tuple(ex.response_ids[0]): ex for ex in loader.items}
    eos = tok.eos_token_id
    assert (eos,) in by_chosen  # the empty response is its eos token
    assert tuple(tok.encode("better")) + (eos,) in by_chosen  # label 0 → swapped
    # the truncated row: response = first max_len − prompt tokens of the text, mask aligned
    batch = batch_arrays(next(loader))
    rows = np.asarray(batch["tokens"]), np.asarray(batch["mask"]), np.asarray(batch["attention_mask"])
    truncated = [i for i in range(len(rows[0])) if rows[2][i].sum() == config.max_len]
    for tokens, mask, att in zip(*rows):
        assert mask[:2].sum() == 0 and np.all(mask[2:] == att[2:])  # response = every real token after "p:"
    for i in truncated:
        np.testing.assert_array_equal(rows[0][i][rows[1][i] > 0], tok.encode("abcdefghijklmnop")[:10])
    # empty response trains with a finite loss (also length-normalised)
    norm = dataclasses.replace(config, length_normalize=True)
    split = split_model(_model())
    for cfg in (config, norm):
        loss, _ = dpo_forward_loss(split.merge(), batch, jnp.zeros(batch["tokens"].shape[0]), cfg)
        assert np.isfinite(float(loss))
    # nothing left to learn
    with pytest.raises(ValueError, match="chosen == rejected"):
        make_preference_loader(config, tok, [records[0]] * 3)
    with pytest.raises(ValueError, match="ties"):
        make_preference_loader(config, tok, [records[3]])
    with pytest.raises(ValueError, match="dataset is empty"):
        make_preference_loader(config, tok, [])
    with pytest.raises(ValueError, match="max_len"):
        make_preference_loader(dataclasses.replace(config, overlong="error"), tok, [records[2], records[4]])


def test_jsonl_chat_records(tmp_path):
    tok = CharTokenizer()
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}],
             "chosen": [{"role": "assistant", "content": w}], "rejected": [{"role": "assistant", "content": w.upper()}]}
            for w in ("ab", "cd", "ef", "gh")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loader, stats = make_preference_loader(_config(tmp_path, batch_size=2, max_len=48), tok, str(path), shuffle=False)
    assert stats.kept == 4
    ex = loader.items[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": "say ab"}], add_generation_prompt=True)
    assert ex.prompt_ids == tuple(tok.encode(prompt))
    assert ex.response_ids == (tuple(tok.encode("ab")) + (tok.eos_token_id,), tuple(tok.encode("AB")) + (tok.eos_token_id,))


# ---------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


def test_resume_and_precomputed_reference(tmp_path, monkeypatch):
    """(a) precomputed reference, uninterrupted; (b) the same run interrupted after step 4
    and resumed: identical metrics and parameters; (c) on-the-fly reference: the same
    numbers up to float rounding."""
    data = synthetic_pairs(16, 0)
    tok = CharTokenizer()
    ref = _model(1)

    def config(name, resume=False, precompute=True):
        return _config(tmp_path / name, precompute_reference=precompute, run=RunConfig(
            output_dir=str(tmp_path / name), total_steps=6, checkpoint_every=2, progress=False, resume=resume))

    full = train(config("a"), policy=_model(), tokenizer=tok, preferences=data, reference=ref)
    original = TrainLoop.end_step

    def end_step(self, step, *args, **kw):
        row = original(self, step, *args, **kw)
        if step == 4:  # step 4 logged; the last checkpoint holds 4 completed steps
            self.checkpointer.wait()
            raise Interrupt
        return row

    monkeypatch.setattr(TrainLoop, "end_step", end_step)
    with pytest.raises(Interrupt):
        train(config("b"), policy=_model(), tokenizer=tok, preferences=data, reference=ref)
    monkeypatch.setattr(TrainLoop, "end_step", original)
    resumed = train(config("b", resume=True), policy=_model(), tokenizer=tok, preferences=data, reference=ref)

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(6))
    assert strip(a) == strip(b)
    chex.assert_trees_all_equal(nnx.state(full.model, nnx.Param), nnx.state(resumed.model, nnx.Param))
    assert (tmp_path / "a" / dpo.REFERENCE_CACHE).exists()
    assert json.loads((tmp_path / "a" / dpo.DATA_STATS).read_text())["kept"] == 16

    on_the_fly = train(config("c", precompute=False), policy=_model(), tokenizer=tok, preferences=data, reference=ref)
    assert not (tmp_path / "c" / dpo.REFERENCE_CACHE).exists()
    for x, y in zip(full.history, on_the_fly.history):
        for key in ("loss", "reward_accuracy", "reward_margin", "ref_logps_chosen", "ref_logps_rejected", "kl_chosen"):
            np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-6)
    assert full.history[0]["reward_margin"] != 0.0  # the reference is `ref`, not the initial policy


# ---------------------------------------------------------------- learning


@pytest.mark.slow
def test_dpo_raises_reward_accuracy_on_synthetic_preferences(tmp_path):
    """Learning claims, with margin on seeds 0 / 1 / 2 (model init, data, run seed; seed 0
    with XLA_FLAGS=--xla_cpu_max_isa=AVX2 identical to seed 0): held-out reward and log-prob
    accuracy 1.0 / 1.0 / 1.0 (>= 0.95), reward margin 2.52 / 2.60 / 2.59 (> 0.5), log-prob
    accuracy before 0.63 / 0.53 / 0.41 (< 0.95), last-5 train accuracy 1.0 / 1.0 / 1.0,
    final loss 0.099 / 0.076 / 0.111 (< 0.347)."""
    tok = CharTokenizer()
    held_out = synthetic_pairs(32, 1)
    config = _config(tmp_path, batch_size=8, optim=OptimConfig(learning_rate=3e-3),
                     run=RunConfig(output_dir=str(tmp_path), total_steps=30, progress=False))
    policy = _model()
    before = evaluate(config, policy=policy, tokenizer=tok, preferences=held_out)
    result = train(config, policy=policy, tokenizer=tok, preferences=synthetic_pairs(64, 0))
    after = evaluate(config, policy=result.model, tokenizer=tok, preferences=held_out, reference=policy)
    assert before["reward_accuracy"] == 0.5 and before["ties"] == 1.0  # π = π_ref: every implicit reward is 0, a tie
    assert after["reward_accuracy"] >= 0.95 and after["reward_margin"] > 0.5
    assert after["logp_accuracy"] >= 0.95 > before["logp_accuracy"]
    hist = result.history
    # step 0: π = π_ref, so every implicit reward is 0 — up to float rounding: the policy's
    # log-probs come from the differentiated forward, the reference's from another program,
    # and the two can round apart. Exact ties held for seed 0 (also with AVX2) and seed 1,
    # but with seed 2 (model, data, run seed) 2 of 16 pairs differed by 1 ulp (rejected
    # reward 4.8e-8, step-0 reward_accuracy 0.4375, ties 0.875), so this checks |reward| ≈ 0
    assert max(abs(hist[0][k]) for k in ("chosen_reward", "rejected_reward", "reward_margin")) < 1e-5
    assert hist[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)
    assert np.mean([r["reward_accuracy"] for r in hist[-5:]]) >= 0.95
    assert hist[-1]["loss"] < 0.5 * np.log(2)
