"""Bad shapes reaching a public op raise a ValueError that names the argument and the
expected shape — before any compute, under jit too."""

import functools

import jax
import numpy as np
import pytest

from jaxrl_llm import ops

BT, BT_SHORT, B, B_SHORT = np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(3), np.zeros(2)

CASES = [
    (lambda: ops.aggregate_loss(BT, BT_SHORT), r"mask has shape \(3, 5\), expected \(3, 4\)"),
    (lambda: ops.aggregate_loss(B, B), r"loss_mat must be \[B, T\]"),
    (lambda: ops.kl_penalty(BT, BT_SHORT), r"ref_logp has shape \(3, 5\)"),
    (lambda: ops.gae(BT, BT_SHORT, BT), r"values has shape \(3, 5\), expected \(3, 4\) \(the shape of rewards\)"),
    (lambda: ops.gae(BT, BT, BT_SHORT), r"mask has shape"),
    (lambda: ops.group_advantages(BT, 2), r"scores must be \[B\]"),
    (lambda: ops.shape_token_rewards(B_SHORT, BT, BT, 0.1), r"scores has shape \(2,\): its first dimension must match kl"),
    (lambda: ops.ppo_policy_loss(BT, BT_SHORT, B, BT), r"old_logp has shape \(3, 5\)"),
    (lambda: ops.ppo_policy_loss(BT, BT, B_SHORT, BT), r"advantages has shape \(2,\): its first dimension must match mask"),
    (lambda: ops.ppo_policy_loss(BT, BT, BT_SHORT, BT), r"advantages has shape \(3, 5\), expected \(3, 4\)"),
    (lambda: ops.gspo_policy_loss(BT, BT, B, BT_SHORT), r"mask has shape"),
    (lambda: ops.value_loss(BT, BT, BT_SHORT, BT), r"returns has shape"),
    (lambda: ops.dpo_loss(B, B, B_SHORT, B), r"ref_chosen has shape \(2,\)"),
    (lambda: ops.bradley_terry_loss(B, B_SHORT), r"r_rejected has shape"),
    (lambda: ops.plackett_luce_loss(B), r"scores must be \[B, T\]"),
    (lambda: ops.overlong_penalty(BT, 10, 2), r"lengths must be \[B\]"),
    (lambda: ops.sequence_logprobs(BT, BT_SHORT), r"mask has shape"),
    (lambda: ops.sft_loss(BT, BT_SHORT), r"mask has shape"),
]


@pytest.mark.parametrize("call, message", CASES)
def test_bad_shapes_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_checks_fire_at_trace_time_under_jit():
    fn = jax.jit(functools.partial(ops.ppo_policy_loss, clip_low=0.2))
    with pytest.raises(ValueError, match="old_logp has shape"):
        fn(BT, BT_SHORT, B, BT)
