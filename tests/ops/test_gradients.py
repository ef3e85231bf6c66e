"""Every loss (log-prob ops: see test_logprobs.py): jax.grad is finite and matches central finite differences (float64)."""

import functools

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrl_llm import ops
from tests.ops.helpers import ragged_mask


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _data(seed=0, b=3, t=5):
    rng = np.random.default_rng(seed)
    mask = ragged_mask(rng, b, t, min_len=1).astype(np.float64)
    old = rng.standard_normal((b, t)) * 0.5 - 1.5
    logp = old + rng.standard_normal((b, t)) * 0.1
    return rng, mask, logp, old


def _scalar(fn):
    return lambda *a: fn(*a)[0]


CASES = {
    "ppo_token_mean": lambda rng, mask, logp, old: (
        _scalar(functools.partial(ops.ppo_policy_loss, old_logp=old, advantages=rng.standard_normal(3), mask=mask, dual_clip=3.0)),
        (logp,),
    ),
    "ppo_seq_norm": lambda rng, mask, logp, old: (
        _scalar(functools.partial(ops.ppo_policy_loss, old_logp=old, advantages=rng.standard_normal((3, 5)), mask=mask, clip_high=0.28, agg="seq_mean_token_sum_norm")),
        (logp,),
    ),
    "gspo": lambda rng, mask, logp, old: (
        _scalar(functools.partial(ops.gspo_policy_loss, old_logp=old, advantages=rng.standard_normal(3), mask=mask, clip_low=0.5, clip_high=0.5)),
        (logp,),
    ),
    "value": lambda rng, mask, logp, old: (
        _scalar(functools.partial(ops.value_loss, old_values=old, returns=rng.standard_normal((3, 5)), mask=mask, clip=0.2)),
        (logp,),
    ),
    "kl_k3": lambda rng, mask, logp, old: (
        lambda l: ops.aggregate_loss(ops.kl_penalty(l, old, "k3"), mask, "token_mean"),
        (logp,),
    ),
    "dpo_sigmoid": lambda rng, mask, logp, old: (
        lambda pc, pr: ops.dpo_loss(pc, pr, old[:, 0], old[:, 1], 0.5, "sigmoid", 0.1)[0],
        (logp[:, 0], logp[:, 1]),
    ),
    "dpo_ipo": lambda rng, mask, logp, old: (
        lambda pc, pr: ops.dpo_loss(pc, pr, old[:, 0], old[:, 1], 0.5, "ipo")[0],
        (logp[:, 0], logp[:, 1]),
    ),
    "bradley_terry": lambda rng, mask, logp, old: (
        lambda rc, rr: ops.bradley_terry_loss(rc, rr, center_coef=0.01)[0],
        (logp[:, 0], logp[:, 1]),
    ),
    "plackett_luce": lambda rng, mask, logp, old: (_scalar(ops.plackett_luce_loss), (logp,)),
    "sft": lambda rng, mask, logp, old: (_scalar(functools.partial(ops.sft_loss, mask=mask, agg="seq_mean_token_mean")), (logp,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_matches_finite_differences(name):
    rng, mask, logp, old = _data()
    fn, args = CASES[name](rng, mask, logp, old)
    grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    for g in grads:
        assert np.all(np.isfinite(g)), name
    assert any(np.any(g != 0) for g in grads), f"{name}: gradient identically zero"
    check_grads(fn, args, order=1, modes=("rev",), atol=1e-5, rtol=1e-5, eps=1e-6)
