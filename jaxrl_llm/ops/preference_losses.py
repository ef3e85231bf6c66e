"""Preference losses: DPO and its variants (offline policy optimisation) and the
Bradley–Terry / Plackett–Luce losses of reward-model training.

All return ``(loss, metrics)``; loss and metrics are batch means (float32 scalars).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_rank, check_same_shape
from jaxrl_llm.ops.masked import upcast

DPO_KINDS = ("sigmoid", "robust", "ipo", "hinge")


def dpo_loss(
    pi_chosen: chex.Array,
    pi_rejected: chex.Array,
    ref_chosen: chex.Array,
    ref_rejected: chex.Array,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Direct preference optimisation losses on sequence log-probs.

      Δ = (pi_chosen − ref_chosen) − (pi_rejected − ref_rejected)
      sigmoid / cDPO: −(1 − ε)·logσ(βΔ) − ε·logσ(−βΔ)          (ε = label_smoothing)
      robust:         (−(1 − ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)
      ipo:            (Δ − 1/(2β))²
      hinge:          relu(1 − βΔ)

    Reference log-probs are constants (stop-gradient). With ε = 0, sigmoid is DPO and
    equals log 2 when the policy equals the reference.

    References:
      Rafailov et al. 2023, DPO, https://arxiv.org/abs/2305.18290
      Mitchell 2023, cDPO note, https://ericmitchell.ai/cdpo.pdf
      Chowdhury et al. 2024, Provably Robust DPO, https://arxiv.org/abs/2403.00409
      Azar et al. 2023, IPO, https://arxiv.org/abs/2310.12036
      Zhao et al. 2023, SLiC-HF (hinge), https://arxiv.org/abs/2305.10425

    Args:
      pi_chosen, pi_rejected: [B] float policy sequence log-probs.
      ref_chosen, ref_rejected: [B] float reference sequence log-probs.
      beta: β > 0.
      kind: one of DPO_KINDS.
      label_smoothing: ε in [0, 0.5) (sigmoid and robust only).

    Returns:
      (loss, metrics) with ``reward_accuracy`` (1 per pair whose chosen implicit reward
      β·(pi − ref) is higher, 0.5 per exact tie, as at π = π_ref), ``ties`` (fraction of
      exact ties), ``reward_margin``, ``chosen_reward``, ``rejected_reward``.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"kind must be one of {DPO_KINDS}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    check_rank(1, pi_chosen=pi_chosen)
    check_same_shape(pi_chosen=pi_chosen, pi_rejected=pi_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    pi_chosen, pi_rejected = upcast(pi_chosen), upcast(pi_rejected)
    ref_chosen = jax.lax.stop_gradient(upcast(ref_chosen))
    ref_rejected = jax.lax.stop_gradient(upcast(ref_rejected))

    chosen_logratio = pi_chosen - ref_chosen
    rejected_logratio = pi_rejected - ref_rejected
    delta = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if kind == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif kind == "robust":
        losses = (
            -(1 - eps) * jax.nn.log_sigmoid(beta * delta) + eps * jax.nn.log_sigmoid(-beta * delta)
        ) / (1 - 2 * eps)
    elif kind == "ipo":
        losses = jnp.square(delta - 1.0 / (2.0 * beta))
    else:
        losses = jax.nn.relu(1.0 - beta * delta)

    chosen_reward = jax.lax.stop_gradient(beta * chosen_logratio)
    rejected_reward = jax.lax.stop_gradient(beta * rejected_logratio)
    metrics = {
        "reward_accuracy": jnp.mean(tie_half_accuracy(chosen_reward, rejected_reward)),
        "ties": jnp.mean((chosen_reward == rejected_reward).astype(jnp.float32)),
        "reward_margin": jnp.mean(chosen_reward - rejected_reward),
        "chosen_reward": jnp.mean(chosen_reward),
        "rejected_reward": jnp.mean(rejected_reward),
    }
    return jnp.mean(losses), metrics


def tie_half_accuracy(chosen: chex.Array, rejected: chex.Array) -> chex.Array:
    """[B] float32: 1 where ``chosen`` scores higher, 0 where lower, 0.5 for an exact tie.

    A tie is no preference either way: counting it wrong would report accuracy 0 for the
    reference policy itself (every implicit reward is 0 there), where chance is 0.5.
    """
    return jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)).astype(jnp.float32)


def bradley_terry_loss(
    r_chosen: chex.Array,
    r_rejected: chex.Array,
    margin: chex.Array | None = None,
    center_coef: float = 0.0,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Pairwise reward-model loss under the Bradley–Terry model.

      loss = mean(−logσ(r_c − r_r − margin)) + center_coef·mean((r_c + r_r)²)

    The centring term (Eisenstein et al. 2023) pins the reward's free offset near 0.

    References:
      Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT RM);
      Touvron et al. 2023, Llama 2 (margin); Eisenstein et al. 2023 (centring)

    Args:
      r_chosen: [B] float rewards of preferred responses.
      r_rejected: [B] float rewards of dispreferred responses.
      margin: optional [B] float (or scalar) preference-strength margin (constant).
      center_coef: weight of the centring term.

    Returns:
      (loss, metrics) with ``accuracy`` (fraction r_c > r_r) and ``margin_mean``.
    """
    check_rank(1, r_chosen=r_chosen)
    check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    r_chosen = upcast(r_chosen)
    r_rejected = upcast(r_rejected)
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - jax.lax.stop_gradient(upcast(margin))
    loss = -jnp.mean(jax.nn.log_sigmoid(diff))
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(r_chosen + r_rejected))
    metrics = {
        "accuracy": jnp.mean((r_chosen > r_rejected).astype(jnp.float32)),
        "margin_mean": jnp.mean(jax.lax.stop_gradient(r_chosen - r_rejected)),
    }
    return loss, metrics


def plackett_luce_loss(scores: chex.Array) -> tuple[chex.Array, dict[str, chex.Array]]:
    """k-wise ranking loss under the Plackett–Luce model.

      loss = mean_b −Σ_{k=1..K} (s_k − logsumexp(s_k, …, s_K))

    ``scores`` are ordered best → worst. With K = 2 this is the Bradley–Terry loss.

    References:
      Plackett 1975; Luce 1959; Zhu et al. 2023, Principled RLHF with pairwise or
      K-wise comparisons, https://arxiv.org/abs/2301.11270

    Args:
      scores: [B, K] float rewards of K responses ranked best first, K ≥ 2.

    Returns:
      (loss, metrics) with ``top1_accuracy`` (best response scored highest) and
      ``pairwise_accuracy`` (fraction of the K(K−1)/2 pairs ordered correctly).
    """
    check_rank(2, scores=scores)
    if scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, K] with K >= 2, got shape {scores.shape}")
    scores = upcast(scores)
    # logsumexp over the suffix s_k..s_K for every k.
    suffix_lse = jax.lax.cumlogsumexp(scores, axis=1, reverse=True)
    loss = -jnp.mean(jnp.sum(scores - suffix_lse, axis=1))
    k = scores.shape[1]
    upper = jnp.triu(jnp.ones((k, k), bool), 1)  # pairs (i, j) with i ranked above j
    correct = scores[:, :, None] > scores[:, None, :]
    metrics = {
        "top1_accuracy": jnp.mean((jnp.argmax(scores, axis=1) == 0).astype(jnp.float32)),
        "pairwise_accuracy": jnp.sum(correct & upper) / (scores.shape[0] * jnp.sum(upper)),
    }
    return loss, metrics
