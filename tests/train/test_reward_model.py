"""Reward-model trainer: Bradley–Terry / Plackett–Luce batch losses against the ops and
numpy, K = 2 Plackett–Luce = Bradley–Terry, AUC, learning a known scoring function,
save → load round trip, resume, bad inputs."""

import dataclasses
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.preferences import PreferenceLoader
from jaxrl_llm.models import CausalLM, CharTokenizer, RewardModel, load_hf, tiny_config
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.metrics import read_metrics
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import split_model
from jaxrl_llm.train.reward_model import (
    RewardConfig,
    as_reward_model,
    bradley_terry_batch_loss,
    pairwise_metrics,
    plackett_luce_batch_loss,
    roc_auc,
    score_sequences,
    train,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def tiny_rm(seed=0, pool="last"):
    return RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed), pool=pool)


def synthetic_pairs(n, seed, length=8):
    """Pairs of random strings; the one with more 'a's is chosen (a known scoring function)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        x, y = ("".join(rng.choice(list("abcde"), length)) for _ in range(2))
        if x.count("a") == y.count("a"):
            continue
        c, r = (x, y) if x.count("a") > y.count("a") else (y, x)
        out.append({"prompt": "s:", "chosen": c, "rejected": r, "margin": float(c.count("a") - r.count("a"))})
    return out


def base_config(tmp_path, name="run", **kw):
    fields = dict(run=RunConfig(output_dir=str(tmp_path / name), total_steps=2, progress=False),
                  optim=OptimConfig(learning_rate=3e-3), batch_size=8, max_len=16, eval_batch_size=16)
    fields.update(kw)
    return RewardConfig(**fields)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(loss="hinge"), "loss"), (dict(pool="none"), "pool"), (dict(overlong="cut"), "overlong"),
     (dict(ties="keep"), "ties"), (dict(loss="plackett_luce", margin=1.0), "margin"), (dict(batch_size=0), "batch_size")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kwargs)


def test_roc_auc_matches_brute_force():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 13).astype(float), rng.integers(0, 5, 9).astype(float)  # many ties
    brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)])
    np.testing.assert_allclose(roc_auc(pos, neg), brute)
    m = pairwise_metrics(np.array([2.0, 1.0, 0.0]), np.array([1.0, 2.0, 5.0]), labels=np.array([1.0, 1.0, 0.5]))
    assert m["num_pairs"] == 2 and m["accuracy"] == 0.5  # the tied pair is not counted


def _pair_batch(records, tok, margins=None):
    loader = PreferenceLoader(records, tok, len(records), max_len=16, shuffle=False, bucket="max")
    batch = next(loader)
    arrays = {f.name: jnp.asarray(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    arrays["margin"] = jnp.asarray(np.zeros(len(records)) if margins is None else margins, jnp.float32)
    return arrays


def test_k2_plackett_luce_equals_bradley_terry_loss_and_gradients():
    tok = CharTokenizer()
    pairs = synthetic_pairs(6, 0)
    kwise = [{"prompt": p["prompt"], "responses": [p["rejected"], p["chosen"]], "ranking": [2, 1]} for p in pairs]
    pair_arrays = _pair_batch(pairs, tok)
    kw_batch = next(PreferenceLoader(kwise, tok, 6, max_len=16, kind="kwise", shuffle=False, bucket="max"))
    kw_arrays = {f.name: jnp.asarray(getattr(kw_batch, f.name)) for f in dataclasses.fields(kw_batch)}
    split = split_model(tiny_rm())

    def value_and_grad(fn, batch):
        return jax.jit(jax.value_and_grad(lambda p: fn(split.merge(p), batch)[0]))(split.params)

    l_bt, g_bt = value_and_grad(bradley_terry_batch_loss, pair_arrays)
    l_pl, g_pl = value_and_grad(plackett_luce_batch_loss, kw_arrays)
    np.testing.assert_allclose(float(l_bt), float(l_pl), rtol=1e-6)
    chex.assert_trees_all_close(g_bt, g_pl, rtol=1e-4, atol=1e-7)


def test_bradley_terry_batch_loss_matches_ops_and_numpy():
    tok = CharTokenizer()
    pairs = synthetic_pairs(6, 1)
    pairs[2]["label"] = 0.5  # a tie kept with label 0.5
    margins = np.array([0.0, 0.5, 0.0, 1.0, 0.2, 0.0], np.float32)
    arrays = _pair_batch(pairs, tok, margins)
    model = tiny_rm(2)
    loss, metrics = bradley_terry_batch_loss(model, arrays, margin_const=0.1, center_coef=0.01, length_penalty=0.05)
    tokens = np.concatenate([arrays["chosen_tokens"], arrays["rejected_tokens"]])
    att = np.concatenate([arrays["chosen_attention_mask"], arrays["rejected_attention_mask"]])
    resp_len = np.concatenate([arrays["chosen_mask"], arrays["rejected_mask"]]).sum(-1)
    r = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(att)), np.float64) - 0.05 * resp_len
    rc, rr = r[:6], r[6:]
    logsig = lambda x: -math.log1p(math.exp(-x))
    expected = 0.0
    for i in range(6):
        y, m = float(arrays["labels"][i]), margins[i] + 0.1
        expected += -(y * logsig(rc[i] - rr[i] - m) + (1 - y) * logsig(rr[i] - rc[i] - m)) / 6
    expected += 0.01 * np.mean((rc + rr) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # all labels 1 → exactly ops.bradley_terry_loss on the batch
    arrays["labels"] = jnp.ones(6)
    loss1, _ = bradley_terry_batch_loss(model, arrays, margin_const=0.1, center_coef=0.01, length_penalty=0.05)
    ref, _ = ops.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(margins + 0.1), 0.01)
    np.testing.assert_allclose(float(loss1), float(ref), rtol=1e-5)


def test_reward_model_from_causal_lm_copies_backbone():
    lm = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(4))
    rm = as_reward_model(lm, pool="mean")
    assert rm.pool == "mean"
    chex.assert_trees_all_equal(nnx.state(lm.model, nnx.Param), nnx.state(rm.model, nnx.Param))


@pytest.mark.slow
def test_learns_known_scoring_function_and_saves_hf(tmp_path):
    """Holds with margin on seeds 0 / 1 / 2 (model init, data, run seed; seed 0 with
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 same as seed 0 to 3 digits): eval accuracy 1.0 / 0.99 /
    1.0 (>= 0.9), AUC 0.891 / 0.888 / 0.912 (> 0.75), loss 0.69 → 0.027 / 0.088 / 0.041,
    score('aaab') - score('bcde') 8.8 / 9.8 / 8.0 (> 0)."""
    tok = CharTokenizer()
    config = base_config(tmp_path, run=RunConfig(output_dir=str(tmp_path / "rm"), total_steps=60, progress=False),
                         batch_size=16, eval_every=30)
    result = train(config, model=tiny_rm(), tokenizer=tok, preferences=synthetic_pairs(400, 0),
                   eval_preferences=synthetic_pairs(200, 1))
    assert result.eval["accuracy"] >= 0.9 and result.eval["num_pairs"] == 200
    assert result.eval["auc"] > 0.75  # across pairs: a chosen may hold fewer 'a's than another pair's rejected
    assert "eval_accuracy" in result.history[29] and "eval_accuracy" not in result.history[28]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the saved sequence-classification checkpoint scores exactly like the trained model
    loaded, _ = load_hf(str(tmp_path / "rm" / "reward_model"), kind="reward")
    rows = tok(["s:aaab", "s:bcde", "s:aa"], add_eos=True)
    mine = score_sequences(result.model, rows["input_ids"], rows["attention_mask"], batch_size=4)
    theirs = score_sequences(loaded, rows["input_ids"], rows["attention_mask"], batch_size=4)
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert mine[0] > mine[1]


def test_plackett_luce_end_to_end_and_margin_field(tmp_path):
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    kwise = []
    for _ in range(16):
        resp = ["".join(rng.choice(list("abc"), 6)) for _ in range(3)]
        kwise.append({"prompt": "s:", "responses": resp, "scores": [r.count("a") + 0.01 * i for i, r in enumerate(resp)]})
    config = base_config(tmp_path, loss="plackett_luce", save_hf=False)
    result = train(config, model=tiny_rm(), tokenizer=tok, preferences=kwise, eval_preferences=kwise[:8])
    assert all(np.isfinite(r["loss"]) for r in result.history) and 0 <= result.eval["accuracy"] <= 1
    # Bradley–Terry with a per-pair margin field, k-wise records expanded into pairs
    config = base_config(tmp_path, name="bt", margin_field="margin", save_hf=False)
    pairs = synthetic_pairs(16, 3)
    result = train(config, model=tiny_rm(), tokenizer=tok, preferences=pairs)
    assert result.eval is None and np.isfinite(result.history[-1]["loss"])


def test_resumed_run_continues_exactly(tmp_path):
    tok = CharTokenizer()
    data = synthetic_pairs(64, 0)
    full = train(base_config(tmp_path, name="a", save_hf=False,
                             run=RunConfig(output_dir=str(tmp_path / "a"), total_steps=4, progress=False)),
                 model=tiny_rm(), tokenizer=tok, preferences=data)
    train(base_config(tmp_path, name="b", save_hf=False), model=tiny_rm(), tokenizer=tok, preferences=data)  # 2 steps
    resumed = train(base_config(tmp_path, save_hf=False,
                                run=RunConfig(output_dir=str(tmp_path / "b"), total_steps=4, progress=False, resume=True)),
                    model=tiny_rm(), tokenizer=tok, preferences=data)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    chex.assert_trees_all_equal(nnx.state(full.model, nnx.Param), nnx.state(resumed.model, nnx.Param))


def test_bad_inputs(tmp_path):
    tok = CharTokenizer()
    config = base_config(tmp_path, save_hf=False)
    common = dict(model=tiny_rm(), tokenizer=tok)
    good = synthetic_pairs(8, 0)
    with pytest.raises(ValueError, match="dataset is empty"):
        train(config, preferences=[], **common)
    with pytest.raises(ValueError, match="missing field 'rejected'"):
        train(config, preferences=[{"prompt": "s:", "chosen": "a"}] * 8, **common)
    with pytest.raises(ValueError, match="0 tokens"):
        train(config, preferences=[{"prompt": "", "chosen": "a", "rejected": "b"}] * 8, **common)
    long = [{"prompt": "x" * 40, "chosen": "a", "rejected": "b"}] * 8
    with pytest.raises(ValueError, match="max_len"):
        train(dataclasses.replace(config, overlong="error"), preferences=long, **common)
    with pytest.raises(ValueError, match="every preference record was dropped"):
        train(config, preferences=long, **common)  # default "truncate": no room left for a response
    with pytest.raises(ValueError, match="margin field 'gap'"):
        train(dataclasses.replace(config, margin_field="gap"), preferences=good, **common)
    with pytest.raises(ValueError, match="k-wise records"):
        train(dataclasses.replace(config, loss="plackett_luce"), preferences=good, **common)
    with pytest.raises(ValueError, match="pool"):
        train(config, model=RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0), pool="none"),
              tokenizer=tok, preferences=good)

    class NoPad(CharTokenizer):  # no pad token: eos pads (always masked)
        def __init__(self):
            super().__init__()
            self.pad_token_id = None

    result = train(dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(tmp_path / "np"))),
                   model=tiny_rm(), tokenizer=NoPad(), preferences=good)
    assert np.isfinite(result.history[-1]["loss"])
