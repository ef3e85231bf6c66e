"""Pure, jittable RL math on arrays (no parameters, no I/O).

Every function works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``; losses return
``(loss, metrics)``. Each function's docstring gives its formula and shapes; see
docs/architecture.md for the conventions.
"""

from jaxrl_llm.ops.advantages import (
    GROUP_SCALES,
    gae,
    group_advantages,
    last_valid_index,
    rloo_advantages,
    shape_token_rewards,
)
from jaxrl_llm.ops.distillation import (
    DISTILL_KINDS,
    distill_divergence,
    distill_loss,
    divergence_from_logits,
)
from jaxrl_llm.ops.kl import KL_KINDS, adaptive_kl_coef, kl_penalty
from jaxrl_llm.ops.logprobs import entropy_from_logits, logprobs_from_hidden, token_logprobs
from jaxrl_llm.ops.masked import (
    AGGREGATION_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from jaxrl_llm.ops.policy_losses import gspo_policy_loss, ppo_policy_loss, value_loss
from jaxrl_llm.ops.rollout_correction import IS_LEVELS, IS_MODES, rollout_correction
from jaxrl_llm.ops.preference_losses import (
    DPO_KINDS,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    plackett_luce_loss,
    simpo_loss,
    tie_half_accuracy,
)
from jaxrl_llm.ops.rewards import overlong_penalty, sequence_logprobs
from jaxrl_llm.ops.supervised import sft_loss

__all__ = [
    "AGGREGATION_MODES",
    "DISTILL_KINDS",
    "DPO_KINDS",
    "GROUP_SCALES",
    "IS_LEVELS",
    "IS_MODES",
    "KL_KINDS",
    "adaptive_kl_coef",
    "aggregate_loss",
    "bradley_terry_loss",
    "distill_divergence",
    "distill_loss",
    "divergence_from_logits",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "gspo_policy_loss",
    "rollout_correction",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "last_valid_index",
    "logprobs_from_hidden",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "overlong_penalty",
    "plackett_luce_loss",
    "ppo_policy_loss",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "tie_half_accuracy",
    "shape_token_rewards",
    "token_logprobs",
    "value_loss",
]
