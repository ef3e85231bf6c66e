"""Masked positions never leak: NaN / ±inf (and out-of-range token ids) at masked
positions of any input of an op leave its value unchanged and its gradients finite.

For every op: the value with poison at the masked positions of one input (and of all
inputs at once) equals the value with those positions set to 0, and equals the value with
arbitrary finite numbers there; ``jax.grad`` with respect to every float input is finite
everywhere and exactly 0 at the masked positions. ``x * mask`` fails this (NaN·0 = NaN,
in the value and in the backward pass); ``jnp.where(mask, x, 0)`` before any arithmetic
passes it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrl_llm import ops

B, T, V, D = 4, 6, 7, 5
# a full row, a right-padded row, a row with holes, a row with no valid token
MASK = np.array(
    [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32
)
MASKED = MASK == 0  # [B, T] positions to poison
EMPTY_ROWS = ~MASK.any(axis=-1)  # [B] rows whose per-sequence inputs are never used
G = 4
SCORED = np.array([1, 1, 0, 1, 1, 0, 0, 0], np.float32)  # second group: one scored sample
FLOAT_POISON = (np.nan, np.inf, -np.inf)
ID_POISON = (-100, V + 3)


@dataclasses.dataclass
class Case:
    fn: Callable  # (*inputs in ``inputs`` order) -> pytree of float outputs
    inputs: dict[str, np.ndarray]
    masked: dict[str, np.ndarray]  # input name -> bool positions to poison (its shape)
    grad: tuple[str, ...]  # float inputs to differentiate


def _rng(seed):
    return np.random.default_rng(seed)


def _bt(seed, scale=1.0, shift=0.0):
    return (_rng(seed).standard_normal((B, T)) * scale + shift).astype(np.float32)


def _case_1(fn, x_name="x", seed=0, shift=0.0):
    return Case(fn, {x_name: _bt(seed, shift=shift)}, {x_name: MASKED}, (x_name,))


def _policy_inputs(seed, seq_adv=False):
    old = _bt(seed, 0.5, -1.5)
    logp = old + _bt(seed + 1, 0.3)
    adv = _rng(seed + 2).standard_normal(B).astype(np.float32) if seq_adv else _bt(seed + 2)
    return {"logp": logp, "old_logp": old, "advantages": adv}, {
        "logp": MASKED, "old_logp": MASKED, "advantages": EMPTY_ROWS if seq_adv else MASKED}


def _ppo(seq_adv=False, **kw):
    inputs, masked = _policy_inputs(10, seq_adv)
    return Case(lambda lp, old, adv: ops.ppo_policy_loss(lp, old, adv, MASK, **kw), inputs, masked,
                ("logp", "old_logp", "advantages"))


def _gspo():
    inputs, masked = _policy_inputs(20, seq_adv=True)
    return Case(lambda lp, old, adv: ops.gspo_policy_loss(lp, old, adv, MASK, clip_low=0.1, clip_high=0.1),
                inputs, masked, ("logp", "old_logp", "advantages"))


def _value(**kw):
    inputs = {"values": _bt(30), "old_values": _bt(31), "returns": _bt(32)}
    return Case(lambda v, o, r: ops.value_loss(v, o, r, MASK, **kw), inputs, dict.fromkeys(inputs, MASKED),
                tuple(inputs))


def _kl(kind):
    def fn(lp, ref):
        kl = ops.kl_penalty(lp, ref, kind, mask=MASK)
        return kl, ops.aggregate_loss(kl, MASK)

    inputs = {"logp": _bt(40, 0.5, -1.0), "ref_logp": _bt(41, 0.5, -1.0)}
    return Case(fn, inputs, dict.fromkeys(inputs, MASKED), tuple(inputs))


def _gae(method):
    inputs = {"rewards": _bt(50), "values": _bt(51)}
    return Case(lambda r, v: ops.gae(r, v, MASK, gamma=0.99, lam=0.95, method=method), inputs,
                dict.fromkeys(inputs, MASKED), tuple(inputs))


def _shape_rewards():
    inputs = {"scores": _rng(60).standard_normal(B).astype(np.float32), "kl": np.abs(_bt(61))}
    return Case(lambda s, kl: ops.shape_token_rewards(s, kl, MASK, 0.1), inputs,
                {"scores": EMPTY_ROWS, "kl": MASKED}, tuple(inputs))


def _group(fn):
    inputs = {"scores": _rng(70).standard_normal(SCORED.shape[0]).astype(np.float32)}
    return Case(lambda s: fn(s, SCORED), inputs, {"scores": SCORED == 0}, ("scores",))


def _dpo(kind, length_normalize=False):
    names = ("pi_chosen", "pi_rejected", "ref_chosen", "ref_rejected")
    inputs = {n: _bt(80 + i, 0.5, -2.0) for i, n in enumerate(names)}

    def fn(*token_logps):
        seqs = [ops.sequence_logprobs(x, MASK, length_normalize) for x in token_logps]
        return seqs, ops.dpo_loss(*seqs, beta=0.5, kind=kind, label_smoothing=0.1 if kind == "robust" else 0.0)

    return Case(fn, inputs, dict.fromkeys(names, MASKED), names)


def _reference_free(kind):
    """SimPO / ORPO on per-sequence sums and token counts of masked per-token log-probs."""
    names = ("pi_chosen", "pi_rejected")
    inputs = {n: _bt(85 + i, 0.5, -2.0) for i, n in enumerate(names)}
    lengths = jnp.asarray(MASK.sum(axis=-1))

    def fn(chosen, rejected):
        seqs = [ops.sequence_logprobs(x, MASK) for x in (chosen, rejected)]
        if kind == "simpo":
            return seqs, ops.simpo_loss(*seqs, lengths, lengths, beta=2.0, gamma=0.5)
        nll = -ops.masked_mean(chosen, MASK)
        return seqs, ops.orpo_loss(*seqs, lengths, lengths, nll, lam=0.1)

    return Case(fn, inputs, dict.fromkeys(names, MASKED), names)


def _kto():
    names = ("pi", "ref", "pi_kl", "ref_kl")
    inputs = {n: _bt(87 + i, 0.5, -2.0) for i, n in enumerate(names)}
    labels = jnp.asarray([1.0, 0.0, 1.0, 0.0])

    def fn(*token_logps):
        pi, ref, pi_kl, ref_kl = [ops.sequence_logprobs(x, MASK) for x in token_logps]
        z0 = ops.kto_reference_point(pi_kl, ref_kl)
        return pi, ops.kto_loss(pi, ref, labels, z0, beta=0.5)

    return Case(fn, inputs, dict.fromkeys(names, MASKED), names)


def _distill(kind):
    rng = _rng(97)
    inputs = {"student_hidden": rng.standard_normal((B, T, D)).astype(np.float32),
              "student_unembed": rng.standard_normal((D, V)).astype(np.float32),
              "teacher_hidden": rng.standard_normal((B, T, D + 1)).astype(np.float32),
              "teacher_unembed": rng.standard_normal((D + 1, V)).astype(np.float32)}
    masked = {"student_hidden": np.broadcast_to(MASKED[..., None], (B, T, D)),
              "teacher_hidden": np.broadcast_to(MASKED[..., None], (B, T, D + 1))}

    def fn(hs, ws, ht, wt):
        per_token = ops.distill_divergence(hs, ws, ht, wt, MASK, kind=kind, beta=0.3, chunk_size=5)
        return per_token, ops.distill_loss(per_token, MASK)

    return Case(fn, inputs, masked, ("student_hidden", "student_unembed"))


def _logits_case(fn, with_tokens=True):
    logits = (_rng(90).standard_normal((B, T, V)) * 2).astype(np.float32)
    inputs = {"logits": logits}
    masked = {"logits": np.broadcast_to(MASKED[..., None], logits.shape)}
    if with_tokens:
        inputs["tokens"] = _rng(91).integers(0, V, (B, T)).astype(np.int32)
        masked["tokens"] = MASKED
    return Case(fn, inputs, masked, ("logits",))


def _hidden_case():
    rng = _rng(95)
    inputs = {"hidden": rng.standard_normal((B, T, D)).astype(np.float32),
              "unembed": rng.standard_normal((D, V)).astype(np.float32),
              "tokens": rng.integers(0, V, (B, T)).astype(np.int32)}
    masked = {"hidden": np.broadcast_to(MASKED[..., None], (B, T, D)), "tokens": MASKED}

    def fn(h, w, tok):
        logp, ent = ops.logprobs_from_hidden(h, w, tok, chunk_size=5, mask=MASK)
        return logp, ent, ops.aggregate_loss(-logp - 0.1 * ent, MASK)

    return Case(fn, inputs, masked, ("hidden", "unembed"))


CASES: dict[str, Callable[[], Case]] = {
    "masked_sum": lambda: _case_1(lambda x: ops.masked_sum(x, MASK)),
    "masked_sum-axis": lambda: _case_1(lambda x: ops.masked_sum(x, MASK, axis=-1)),
    "masked_mean": lambda: _case_1(lambda x: ops.masked_mean(x, MASK)),
    "masked_mean-axis": lambda: _case_1(lambda x: ops.masked_mean(x, MASK, axis=-1)),
    "masked_var": lambda: _case_1(lambda x: ops.masked_var(x, MASK)),
    "masked_var-biased": lambda: _case_1(lambda x: ops.masked_var(x, MASK, unbiased=False)),
    "masked_whiten": lambda: _case_1(lambda x: ops.masked_whiten(x, MASK)),
    "masked_whiten-no-shift": lambda: _case_1(lambda x: ops.masked_whiten(x, MASK, shift_mean=False)),
    **{f"aggregate_loss-{mode}": (lambda mode=mode: _case_1(lambda x: ops.aggregate_loss(x, MASK, mode)))
       for mode in ops.AGGREGATION_MODES},
    "ppo_policy_loss": lambda: _ppo(),
    "ppo_policy_loss-dual-clip": lambda: _ppo(dual_clip=3.0, clip_high=0.28),
    "ppo_policy_loss-seq-adv-seq-norm": lambda: _ppo(seq_adv=True, agg="seq_mean_token_sum_norm"),
    "ppo_policy_loss-seq-mean-token-mean": lambda: _ppo(agg="seq_mean_token_mean"),
    "gspo_policy_loss": _gspo,
    "value_loss": lambda: _value(),
    "value_loss-no-clip": lambda: _value(clip=None),
    **{f"kl_penalty-{kind}": (lambda kind=kind: _kl(kind)) for kind in ops.KL_KINDS},
    "gae-scan": lambda: _gae("scan"),
    "gae-associative": lambda: _gae("associative"),
    "shape_token_rewards": _shape_rewards,
    **{f"group_advantages-{scale}": (lambda scale=scale: _group(
        functools.partial(lambda s, m, scale: ops.group_advantages(s, G, scale, mask=m), scale=scale)))
       for scale in ops.GROUP_SCALES},
    "rloo_advantages": lambda: _group(lambda s, m: ops.rloo_advantages(s, G, mask=m)),
    "sequence_logprobs": lambda: _case_1(lambda x: ops.sequence_logprobs(x, MASK), shift=-2.0),
    "sequence_logprobs-length-normalize": lambda: _case_1(lambda x: ops.sequence_logprobs(x, MASK, True), shift=-2.0),
    **{f"dpo_loss-{kind}": (lambda kind=kind: _dpo(kind)) for kind in ops.DPO_KINDS},
    "dpo_loss-length-normalize": lambda: _dpo("sigmoid", length_normalize=True),
    "simpo_loss": lambda: _reference_free("simpo"),
    "orpo_loss": lambda: _reference_free("orpo"),
    "kto_loss": _kto,
    **{f"distill_divergence-{kind}": (lambda kind=kind: _distill(kind)) for kind in ops.DISTILL_KINDS},
    **{f"sft_loss-{mode}": (lambda mode=mode: _case_1(lambda x: ops.sft_loss(x, MASK, mode), shift=-2.0))
       for mode in ops.AGGREGATION_MODES},
    "token_logprobs": lambda: _logits_case(
        lambda z, tok: (lambda lp: (lp, ops.sft_loss(lp, MASK)))(ops.token_logprobs(z, tok, mask=MASK))),
    "entropy_from_logits": lambda: _logits_case(
        lambda z: (lambda h: (h, ops.aggregate_loss(h, MASK)))(ops.entropy_from_logits(z, mask=MASK)),
        with_tokens=False),
    "logprobs_from_hidden": _hidden_case,
}


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def _scalar(fn):
    return lambda *xs: sum(jnp.sum(x) for x in _float_leaves(fn(*xs)))


def _poisoned(case: Case, names, value):
    xs = dict(case.inputs)
    for n in names:
        xs[n] = np.where(case.masked[n], np.asarray(value, xs[n].dtype), xs[n])
    return xs


def _assert_same(got, want, what):
    got_l, want_l = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_l) == len(want_l)
    for g, w in zip(got_l, want_l):
        g, w = np.asarray(g), np.asarray(w)
        assert np.all(np.isfinite(g)), f"{what}: non-finite output {g}"
        np.testing.assert_array_equal(g, w, err_msg=what)


class MaskedNaNSafetyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in CASES])
    def test_poison_at_masked_positions_does_not_leak(self, name):
        case = CASES[name]()
        names = list(case.inputs)
        fn = self.variant(case.fn)
        argnums = tuple(names.index(n) for n in case.grad)
        grad_fn = self.variant(jax.grad(_scalar(case.fn), argnums=argnums))

        def call(f, xs):
            return f(*[xs[n] for n in names])

        zeroed = _poisoned(case, case.masked, 0)
        want = call(fn, zeroed)
        _assert_same(want, want, f"{name}: reference")
        # arbitrary finite values at masked positions give the same value as zeros
        _assert_same(call(fn, case.inputs), want, f"{name}: random finite values at masked positions")
        floats = [n for n in case.masked if jnp.issubdtype(case.inputs[n].dtype, jnp.floating)]
        ints = [n for n in case.masked if n not in floats]
        trials = [(which, v) for v in FLOAT_POISON for which in [[n] for n in floats] + [floats]]
        trials += [([n], v) for n in ints for v in ID_POISON]
        for which, value in trials:
            xs = _poisoned(case, which, value)
            what = f"{name}: {value} at masked positions of {which}"
            _assert_same(call(fn, xs), want, what)
            grads = call(grad_fn, xs)
            for n, g in zip(case.grad, grads):
                g = np.asarray(g)
                assert np.all(np.isfinite(g)), f"{what}: d/d{n} is not finite:\n{g}"
                if n in case.masked:
                    np.testing.assert_array_equal(g[case.masked[n]], 0.0, err_msg=f"{what}: d/d{n} at masked positions")


def test_kl_penalty_is_zero_at_masked_positions():
    logp = np.where(MASKED, np.nan, _bt(1)).astype(np.float32)
    for kind in ops.KL_KINDS:
        kl = np.asarray(ops.kl_penalty(logp, _bt(2), kind, mask=MASK))
        assert np.all(kl[MASKED] == 0.0) and np.all(np.isfinite(kl)), kind


def test_logprob_ops_are_unchanged_at_valid_positions_and_zero_at_masked():
    case = _hidden_case()
    h, w, tok = case.inputs["hidden"], case.inputs["unembed"], case.inputs["tokens"]
    lp, ent = ops.logprobs_from_hidden(h, w, tok, chunk_size=5)
    lp_m, ent_m = ops.logprobs_from_hidden(h, w, tok, chunk_size=5, mask=MASK)
    np.testing.assert_array_equal(np.asarray(lp_m)[~MASKED], np.asarray(lp)[~MASKED])
    np.testing.assert_array_equal(np.asarray(ent_m)[~MASKED], np.asarray(ent)[~MASKED])
    assert np.all(np.asarray(lp_m)[MASKED] == 0) and np.all(np.asarray(ent_m)[MASKED] == 0)
    logits = np.einsum("btd,dv->btv", h, w)
    np.testing.assert_array_equal(np.asarray(ops.token_logprobs(logits, tok, mask=MASK))[~MASKED],
                                  np.asarray(ops.token_logprobs(logits, tok))[~MASKED])
    np.testing.assert_array_equal(np.asarray(ops.entropy_from_logits(logits, mask=MASK))[~MASKED],
                                  np.asarray(ops.entropy_from_logits(logits))[~MASKED])


@pytest.mark.parametrize("fn", [ops.group_advantages, ops.rloo_advantages], ids=["group", "rloo"])
def test_group_advantages_with_all_scored_equal_unmasked(fn):
    scores = _rng(3).standard_normal(12).astype(np.float32)
    np.testing.assert_allclose(fn(scores, 4, mask=np.ones(12)), fn(scores, 4), rtol=1e-6, atol=1e-6)
    ties = np.array([1, 1, 1, 1, 0, 1, 0, 1], np.float32)
    assert np.all(np.asarray(fn(ties, 4, mask=np.ones(8)))[:4] == 0)


def test_group_advantages_mask_leaves_unscored_out_of_the_baseline():
    scores = np.array([1.0, 0.0, np.nan, 1.0, 5.0, np.nan, np.nan, np.nan], np.float32)
    scored = np.array([1, 1, 0, 1, 1, 0, 0, 0], np.float32)
    adv = np.asarray(ops.group_advantages(scores, 4, "none", mask=scored))
    np.testing.assert_allclose(adv, [1 / 3, -2 / 3, 0, 1 / 3, 0, 0, 0, 0], rtol=1e-6)
    rloo = np.asarray(ops.rloo_advantages(scores, 4, mask=scored))
    np.testing.assert_allclose(rloo, [0.5, -1.0, 0, 0.5, 0, 0, 0, 0], rtol=1e-6)


# ---- every masked reduction checks its mask like the losses do (ops.checks.check_mask)

REDUCTIONS = {
    "masked_sum": ops.masked_sum,
    "masked_mean": ops.masked_mean,
    "masked_var": ops.masked_var,
    "masked_whiten": ops.masked_whiten,
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_masked_reductions_check_their_mask(name):
    fn = REDUCTIONS[name]
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*found \[0.5\]"):
        fn(x, np.full((2, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*found \[2\]"):
        fn(x, np.full((2, 3), 2, np.int32))
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*found \[nan\]"):
        fn(x, np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"mask must be a bool, int or float mask of 0/1, got dtype complex64"):
        fn(x, np.ones((2, 3), np.complex64))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\) does not broadcast to x of shape \(2, 3\)"):
        fn(x, np.ones((2, 2), np.float32))
    # under jit: shape and dtype still checked at trace time; a traced mask is accepted
    with pytest.raises(ValueError, match="complex64"):
        jax.jit(fn)(x, np.ones((2, 3), np.complex64))
    assert np.all(np.isfinite(jax.jit(fn)(x, jnp.ones((2, 3)))))
    for mask in (np.ones((2, 3), bool), np.ones((2, 3), np.int32), np.ones((2, 3), np.float32)):
        fn(x, mask)


def test_new_mask_arguments_are_checked():
    bt, btv = np.zeros((2, 3), np.float32), np.zeros((2, 3, 5), np.float32)
    tok = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\), expected \(2, 3\)"):
        ops.kl_penalty(bt, bt, mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        ops.kl_penalty(bt, bt, mask=np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\): its first 2 dimensions must match logits"):
        ops.token_logprobs(btv, tok, mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        ops.entropy_from_logits(btv, mask=np.full((2, 3), 2))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\): its first 2 dimensions must match hidden"):
        ops.logprobs_from_hidden(btv, np.zeros((5, 4)), tok, mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\), expected \(4,\)"):
        ops.group_advantages(np.zeros(4), 2, mask=np.ones(3))
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        ops.rloo_advantages(np.zeros(4), 2, mask=np.full(4, 0.5))
    with pytest.raises(ValueError, match=r"mask must be a bool, int or float mask of 0/1, got dtype complex64"):
        ops.ppo_policy_loss(bt, bt, bt, np.ones((2, 3), np.complex64))
