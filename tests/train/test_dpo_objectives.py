"""The DPO trainer's SimPO, ORPO and KTO objectives: the trainer's loss on a fixed batch vs
the op on log-probs from a plain forward, short runs on a tiny model, KTO's unpaired data
(mismatched KL rows, mixed labels) and bad input errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import ops
from jaxrl_llm.data.preferences import UnpairedLoader, collate_unpaired, tokenize_unpaired
from jaxrl_llm.models import CharTokenizer
from jaxrl_llm.train import dpo
from jaxrl_llm.train.dpo import (
    DPOConfig,
    batch_arrays,
    dpo_forward_loss,
    evaluate,
    make_unpaired_loader,
    train,
)
from jaxrl_llm.train.policy import split_model
from tests.train.test_dpo import _config, _fixed_batch, _model, naive_sequence_logprobs, synthetic_pairs


def unpaired_records(n, seed):
    """Lowercase completions are desirable, upper-case ones undesirable (mixed labels)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        word = "".join(rng.choice(list("abcdefgh"), rng.integers(2, 6)))
        good = bool(i % 2 == 0)
        out.append({"prompt": f"q{rng.integers(10)}:", "completion": word if good else word.upper(), "label": good})
    return out


def _trainer_loss(config, policy, batch, ref_sums):
    split = split_model(policy)
    return jax.jit(lambda p: dpo_forward_loss(split.merge(p), batch, ref_sums, config))(split.params)


# ---------------------------------------------------------------- loss on a fixed batch


@pytest.mark.parametrize("kw", [dict(beta=2.0, simpo_gamma=0.5), dict(beta=0.5, simpo_gamma=1.0, label_smoothing=0.1)])
def test_simpo_matches_op_on_naive_logprobs(tmp_path, kw):
    config = _config(tmp_path, loss_kind="simpo", logprob_chunk_size=7, **kw)
    policy = _model(0)
    batch = _fixed_batch(config, n=4, seed=3)
    b = batch["tokens"].shape[0] // 2
    # ref_sums are ignored by a reference-free loss: garbage there changes nothing
    loss, metrics = _trainer_loss(config, policy, batch, jnp.full((2 * b,), 1e3, jnp.float32))
    sums, _, mask = naive_sequence_logprobs(policy, batch)
    n = mask.sum(-1)
    expected, exp_metrics = ops.simpo_loss(sums[:b], sums[b:], n[:b], n[b:], beta=config.beta,
                                           gamma=config.simpo_gamma, label_smoothing=config.label_smoothing)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4, atol=1e-6)
    # the formula once more, by hand: −(1−ε)logσ(z) − ε logσ(−z), z = β(ā_c − ā_r) − γ
    z = config.beta * (sums[:b] / n[:b] - sums[b:] / n[b:]) - config.simpo_gamma
    eps = config.label_smoothing
    by_hand = np.mean((1 - eps) * np.logaddexp(0, -z) + eps * np.logaddexp(0, z))
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-4)
    for key in ("reward_accuracy", "reward_margin", "chosen_reward"):
        np.testing.assert_allclose(float(metrics[key]), float(exp_metrics[key]), rtol=1e-4, atol=1e-6)


def test_orpo_matches_op_on_naive_logprobs(tmp_path):
    config = _config(tmp_path, loss_kind="orpo", beta=0.25, logprob_chunk_size=5)
    policy = _model(0)
    batch = _fixed_batch(config, n=4, seed=4)
    b = batch["tokens"].shape[0] // 2
    loss, metrics = _trainer_loss(config, policy, batch, jnp.zeros((2 * b,), jnp.float32))
    sums, logp, mask = naive_sequence_logprobs(policy, batch)
    n = mask.sum(-1)
    nll = -(logp[:b] * mask[:b]).sum() / mask[:b].sum()  # token mean over chosen responses
    expected, exp_metrics = ops.orpo_loss(sums[:b], sums[b:], n[:b], n[b:], jnp.float32(nll), lam=config.beta)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["or_loss"]), float(exp_metrics["or_loss"]), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["pref_loss"]), float(loss), rtol=1e-6)


def test_kto_batch_rows_and_loss_match_op(tmp_path):
    config = _config(tmp_path, loss_kind="kto", beta=0.3, kto_undesirable_weight=1.3, logprob_chunk_size=6)
    tok = CharTokenizer()
    records = unpaired_records(4, 0)
    loader, stats = make_unpaired_loader(config, tok, records, shuffle=False)
    assert (stats.desirable, stats.undesirable, stats.kept) == (2, 2, 4)
    batch_obj = next(loader)
    batch = batch_arrays(batch_obj)
    b = 4
    assert batch["tokens"].shape[0] == 2 * b and batch["labels"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # rows b..2b−1: prompt i + completion i−1 (mod B)
    items = loader.items
    for i in range(b):
        p, c_prev = items[i].prompt_ids, items[(i - 1) % b].response_ids[0]
        row = batch["tokens"][b + i]
        np.testing.assert_array_equal(row[: len(p) + len(c_prev)], p + c_prev)
        assert batch["mask"][b + i].sum() == len(c_prev) and batch["mask"][i].sum() == len(items[i].response_ids[0])

    policy, reference = _model(0), _model(1)
    pol, _, _ = naive_sequence_logprobs(policy, batch)
    ref, _, _ = naive_sequence_logprobs(reference, batch)
    loss, metrics = _trainer_loss(config, policy, batch, jnp.asarray(ref, jnp.float32))
    # by hand (Ethayarajh et al. eq. 8 / TRL): z0 = max(0, mean KL rows), weighted 1 − σ terms
    z0 = max(0.0, float(np.mean(pol[b:] - ref[b:])))
    r = pol[:b] - ref[:b]
    sig = lambda x: 1 / (1 + np.exp(-x))
    labels = batch["labels"]
    terms = np.where(labels == 1, 1.0 * (1 - sig(0.3 * (r - z0))), 1.3 * (1 - sig(0.3 * (z0 - r))))
    np.testing.assert_allclose(float(loss), terms.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), z0, rtol=1e-4, atol=1e-6)
    # and the op itself on the same log-probs
    expected, _ = ops.kto_loss(pol[:b], ref[:b], labels, ops.kto_reference_point(pol[b:], ref[b:]),
                               beta=0.3, undesirable_weight=1.3)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4, atol=1e-6)


def test_kto_kl_rows_get_no_gradient(tmp_path):
    """z0 is a constant: the trainer's gradient equals that of a forward over the B
    completion rows alone, with z0 passed in as a number."""
    config = _config(tmp_path, loss_kind="kto", beta=0.5)
    loader, _ = make_unpaired_loader(config, CharTokenizer(), unpaired_records(4, 1), shuffle=False)
    batch = batch_arrays(next(loader))
    b = 4
    policy, reference = _model(0), _model(1)
    ref = jnp.asarray(naive_sequence_logprobs(reference, batch)[0], jnp.float32)
    pol = naive_sequence_logprobs(policy, batch)[0]
    z0 = jnp.float32(max(0.0, float(np.mean(pol[b:] - np.asarray(ref)[b:]))))
    split = split_model(policy)
    g = jax.jit(jax.grad(lambda p: dpo_forward_loss(split.merge(p), batch, ref, config)[0]))(split.params)

    def completions_only(p):
        rows = {k: batch[k][:b] for k in ("tokens", "attention_mask", "mask")}
        sums, _, _, _ = dpo.sequence_logprobs(split.merge(p), rows, config.logprob_chunk_size)
        return ops.kto_loss(sums, ref[:b], batch["labels"], z0, beta=0.5)[0]

    expected = jax.jit(jax.grad(completions_only))(split.params)
    leaves = jax.tree.leaves(g)
    assert any(np.any(np.asarray(x) != 0) for x in leaves)
    for a, e in zip(leaves, jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- short runs


@pytest.mark.parametrize("kw", [dict(loss_kind="simpo", beta=2.0), dict(loss_kind="orpo", beta=0.1),
                                dict(loss_kind="kto", beta=0.1)], ids=["simpo", "orpo", "kto"])
def test_two_step_run_finite(tmp_path, kw, monkeypatch):
    seen = {}
    make_update = dpo._make_update

    def spy(split, tx, config, ref_split, placement):
        seen["ref_split"] = ref_split
        return make_update(split, tx, config, ref_split, placement)

    monkeypatch.setattr(dpo, "_make_update", spy)
    config = _config(tmp_path, **kw)
    data = unpaired_records(8, 2) if kw["loss_kind"] == "kto" else synthetic_pairs(8, 2)
    result = train(config, policy=_model(), tokenizer=CharTokenizer(), preferences=data)
    assert len(result.history) == 2
    for row in result.history:
        for key, value in row.items():
            assert np.isfinite(value), (key, value)
    if kw["loss_kind"] == "kto":
        assert seen["ref_split"] is not None  # the initial policy is the reference
        assert 0.0 < result.history[0]["desirable_fraction"] < 1.0
        assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref at step 0
        stats = json.loads((tmp_path / dpo.DATA_STATS).read_text())
        assert stats["desirable"] == 4 and stats["undesirable"] == 4
    else:
        assert seen["ref_split"] is None  # reference-free: no reference model kept
        assert "nll" in result.history[0] if kw["loss_kind"] == "orpo" else "logps_chosen" in result.history[0]


def test_simpo_evaluate_is_reference_free(tmp_path):
    config = _config(tmp_path, loss_kind="simpo", beta=2.0)
    out = evaluate(config, policy=_model(), tokenizer=CharTokenizer(), preferences=synthetic_pairs(8, 5))
    assert out["num_pairs"] == 8 and 0.0 <= out["reward_accuracy"] <= 1.0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_kind="dpo"), "loss_kind"),
    (dict(loss_kind="simpo", precompute_reference=True), "precompute_reference"),
    (dict(loss_kind="orpo", sft_weight=1.0), "sft_weight"),
    (dict(loss_kind="kto", reference_free=True), "reference_free"),
    (dict(loss_kind="kto", precompute_reference=True), "precompute_reference"),
    (dict(loss_kind="kto", length_normalize=True), "length_normalize"),
    (dict(loss_kind="kto", sft_weight=0.5), "sft_weight"),
    (dict(loss_kind="kto", batch_size=1), "batch_size"),
    (dict(loss_kind="kto", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_kind="orpo", label_smoothing=0.1), "label_smoothing"),
    (dict(simpo_gamma=-1.0), "simpo_gamma"),
    (dict(kto_desirable_weight=0.0), "kto_desirable_weight"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kwargs)


def test_new_kinds_are_valid_configs():
    for kind in ("simpo", "orpo", "kto"):
        assert DPOConfig(loss_kind=kind).loss_kind == kind
    assert DPOConfig(loss_kind="simpo", label_smoothing=0.2, sft_weight=1.0).sft_weight == 1.0  # CPO's α


def test_bad_inputs(tmp_path):
    tok = CharTokenizer()
    kto = _config(tmp_path, loss_kind="kto")
    no_label = [{k: v for k, v in r.items() if k != "label"} for r in unpaired_records(4, 0)]
    with pytest.raises(ValueError, match="record 0 has no 'label'"):
        train(kto, policy=_model(), tokenizer=tok, preferences=no_label)
    with pytest.raises(ValueError, match="must be a bool"):
        make_unpaired_loader(kto, tok, [dict(r, label="yes") for r in unpaired_records(4, 0)])
    with pytest.raises(ValueError, match="'completion'"):
        make_unpaired_loader(kto, tok, synthetic_pairs(4, 0))  # paired records given to KTO
    simpo = _config(tmp_path, loss_kind="simpo")
    with pytest.raises(ValueError, match="reference= must be None"):
        train(simpo, policy=_model(), tokenizer=tok, preferences=synthetic_pairs(4, 0), reference=_model(1))
    with pytest.raises(ValueError, match="kto"):
        evaluate(kto, policy=_model(), tokenizer=tok, preferences=unpaired_records(4, 0))
    with pytest.raises(ValueError, match="batch_size"):
        UnpairedLoader(unpaired_records(4, 0), tok, 1, max_len=16)


def test_unpaired_collate_truncates_mismatched_rows():
    """A long completion paired with a long prompt is cut at max_len, never over it."""
    tok = CharTokenizer()
    records = [{"prompt": "p" * 10, "completion": "a", "label": True},
               {"prompt": "q:", "completion": "b" * 10, "label": False}]
    examples, _ = tokenize_unpaired(records, tok, max_len=14)
    batch = collate_unpaired(examples, pad_token_id=0, bucket="max", max_len=14)
    assert batch.tokens.shape == (4, 14)
    # row 2: prompt 0 (10 tokens) + completion 1 (11 with eos) cut to 14
    assert batch.mask[2].sum() == 4 and batch.attention_mask[2].sum() == 14
    np.testing.assert_array_equal(batch.labels, [1.0, 0.0])
