"""Preference losses: DPO and its variants (offline policy optimisation), the
reference-free SimPO and ORPO, the unpaired KTO, and the Bradley–Terry / Plackett–Luce
losses of reward-model training.

All return ``(loss, metrics)``; loss and metrics are batch means (float32 scalars).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_mask, check_rank, check_same_shape
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


# ---------------------------------------------------------------------------- reference-free
# and unpaired variants: SimPO, ORPO, KTO


def _average_logps(sums: chex.Array, lengths: chex.Array) -> chex.Array:
    """Σ log π / max(n, 1): the per-token mean (a row with no token counts as length 1)."""
    return upcast(sums) / jnp.maximum(jax.lax.stop_gradient(upcast(lengths)), 1.0)


def _check_pair_inputs(names_arrays: dict, lengths: dict) -> None:
    check_rank(1, **names_arrays)
    check_same_shape(**names_arrays, **lengths)


def simpo_loss(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    chosen_lengths: chex.Array,
    rejected_lengths: chex.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """SimPO: reference-free, length-normalised preference loss with a target margin.

      ā_c = Σ log π(y_c) / |y_c|,   ā_r = Σ log π(y_r) / |y_r|
      z   = β·(ā_c − ā_r) − γ
      loss = mean(−(1 − ε)·logσ(z) − ε·logσ(−z))

    ``gamma`` is the paper's target reward margin γ, in reward units (the paper and TRL's
    ``CPOConfig(loss_type="simpo", simpo_gamma=γ)`` use the same γ; SimPO's released
    configs give ``gamma_beta_ratio`` = γ/β instead, so γ = gamma_beta_ratio·β). TRL's
    ``cpo_alpha`` NLL term is not part of this op (the trainer's ``sft_weight``).

    Reference:
      Meng et al. 2024, SimPO, https://arxiv.org/abs/2405.14734 (eq. 6)

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] float SUMMED sequence log-probs.
      chosen_lengths, rejected_lengths: [B] response token counts (constants; 0 is read
        as 1).
      beta: β > 0, the reward scale.
      gamma: γ ≥ 0, the target reward margin.
      label_smoothing: ε in [0, 0.5) (conservative loss, as TRL's).

    Returns:
      (loss, metrics) with ``reward_accuracy`` (tie counts ½), ``ties``,
      ``reward_margin``, ``chosen_reward``, ``rejected_reward`` (rewards are β·ā) and
      ``logps_chosen`` / ``logps_rejected`` (mean ā).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (the target reward margin), got {gamma}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_pair_inputs(dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps),
                       dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths))
    avg_c = _average_logps(policy_chosen_logps, chosen_lengths)
    avg_r = _average_logps(policy_rejected_logps, rejected_lengths)
    z = beta * (avg_c - avg_r) - gamma
    eps = label_smoothing
    losses = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    metrics = _reward_metrics(beta * avg_c, beta * avg_r)
    metrics.update(logps_chosen=jax.lax.stop_gradient(jnp.mean(avg_c)),
                   logps_rejected=jax.lax.stop_gradient(jnp.mean(avg_r)))
    return jnp.mean(losses), metrics


def _reward_metrics(chosen_reward: chex.Array, rejected_reward: chex.Array) -> dict[str, chex.Array]:
    """dpo_loss's pairwise reward metrics (constants)."""
    chosen_reward = jax.lax.stop_gradient(chosen_reward)
    rejected_reward = jax.lax.stop_gradient(rejected_reward)
    return {
        "reward_accuracy": jnp.mean(tie_half_accuracy(chosen_reward, rejected_reward)),
        "ties": jnp.mean((chosen_reward == rejected_reward).astype(jnp.float32)),
        "reward_margin": jnp.mean(chosen_reward - rejected_reward),
        "chosen_reward": jnp.mean(chosen_reward),
        "rejected_reward": jnp.mean(rejected_reward),
    }


# ā is clipped here before log(1 − exp(ā)): a sequence the policy is certain of (ā = 0)
# would otherwise have log-odds +inf and a NaN gradient.
ORPO_MAX_AVG_LOGP = -1e-6


def log1mexp(x: chex.Array) -> chex.Array:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012): log(−expm1(x))
    for x > −log 2, log1p(−exp(x)) below."""
    x = upcast(x)
    near_zero = x > -jnp.log(2.0)
    # each branch sees a safe argument, so the unused one cannot put NaN in the gradient
    a = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
    b = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
    return jnp.where(near_zero, a, b)


def orpo_loss(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    chosen_lengths: chex.Array,
    rejected_lengths: chex.Array,
    chosen_nll: chex.Array,
    *,
    lam: float = 0.1,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """ORPO: SFT NLL of the chosen response plus an odds-ratio preference term.

      ā = Σ log π(y) / |y|,      log odds(y) = ā − log(1 − exp(ā))
      L_OR = mean(−logσ(log odds(y_c) − log odds(y_r)))
      loss = chosen_nll + λ·L_OR

    This is TRL's ``ORPOTrainer`` (``beta`` there is λ here): its loss is
    ``nll − mean(β·logσ(log_odds))``. Deliberate difference: ā is clipped at
    ``ORPO_MAX_AVG_LOGP`` (−1e−6) before log(1 − exp(ā)), computed with a stable log1mexp,
    so a response of average probability ≈ 1 gives a finite loss and gradient (TRL
    returns inf / NaN there).

    Reference:
      Hong et al. 2024, ORPO, https://arxiv.org/abs/2403.07691 (eqs. 4, 6, 7)

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] float SUMMED sequence log-probs.
      chosen_lengths, rejected_lengths: [B] response token counts (constants; 0 read as 1).
      chosen_nll: [] float, the NLL of the chosen responses (e.g. ``sft_loss``'s token mean).
      lam: λ ≥ 0, weight of the odds-ratio term.

    Returns:
      (loss, metrics) with ``nll``, ``or_loss`` (L_OR), ``log_odds_ratio`` (mean
      log odds(y_c) − log odds(y_r)), and the pairwise reward metrics of ``dpo_loss`` on
      the rewards λ·ā (TRL's), plus ``logps_chosen`` / ``logps_rejected`` (mean ā).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (the weight of the odds-ratio term), got {lam}")
    _check_pair_inputs(dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps),
                       dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths))
    check_rank(0, hint="[] (a scalar)", chosen_nll=chosen_nll)
    avg_c = _average_logps(policy_chosen_logps, chosen_lengths)
    avg_r = _average_logps(policy_rejected_logps, rejected_lengths)

    def log_odds(avg):
        avg = jnp.minimum(avg, ORPO_MAX_AVG_LOGP)
        return avg - log1mexp(avg)

    ratio = log_odds(avg_c) - log_odds(avg_r)
    or_loss = -jnp.mean(jax.nn.log_sigmoid(ratio))
    nll = upcast(chosen_nll)
    metrics = _reward_metrics(lam * avg_c, lam * avg_r)
    metrics.update(nll=jax.lax.stop_gradient(nll), or_loss=jax.lax.stop_gradient(or_loss),
                   log_odds_ratio=jax.lax.stop_gradient(jnp.mean(ratio)),
                   logps_chosen=jax.lax.stop_gradient(jnp.mean(avg_c)),
                   logps_rejected=jax.lax.stop_gradient(jnp.mean(avg_r)))
    return nll + lam * or_loss, metrics


def kto_reference_point(policy_kl_logps: chex.Array, reference_kl_logps: chex.Array) -> chex.Array:
    """KTO's reference point z0 = max(0, mean_i(log π(y_j|x_i) − log π_ref(y_j|x_i))), detached.

    The log-probs are of MISMATCHED (prompt, completion) pairs, prompt i with the
    completion of another example j ≠ i of the batch, so that the mean estimates
    KL(π ‖ π_ref) on completions unrelated to the prompt (as TRL's ``KTOTrainer`` does;
    the trainer pairs prompt i with completion i − 1 mod B). No gradient flows through z0.

    Args:
      policy_kl_logps, reference_kl_logps: [B] float summed sequence log-probs.

    Returns:
      [] float32 z0 ≥ 0.
    """
    check_rank(1, policy_kl_logps=policy_kl_logps)
    check_same_shape(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    kl = jnp.mean(upcast(policy_kl_logps) - upcast(reference_kl_logps))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    policy_logps: chex.Array,
    reference_logps: chex.Array,
    labels: chex.Array,
    kl_reference_point: chex.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """KTO: Kahneman–Tversky optimisation on UNPAIRED desirable / undesirable examples.

      r_i = log π(y_i|x_i) − log π_ref(y_i|x_i)                  (summed log-probs)
      desirable   (label 1): ℓ_i = w_d·(1 − σ(β·(r_i − z0)))
      undesirable (label 0): ℓ_i = w_u·(1 − σ(β·(z0 − r_i)))
      loss = mean_i ℓ_i

    z0 is ``kto_reference_point`` (a detached constant here too). This is TRL's
    ``KTOTrainer(loss_type="kto")``: the mean runs over all B examples (TRL concatenates
    the weighted desirable and undesirable losses and takes their mean). The paper's
    loss is λ_y − v(x, y); the constant λ_y is dropped, which changes no gradient.

    Reference:
      Ethayarajh et al. 2024, KTO, https://arxiv.org/abs/2402.01306 (eq. 8)

    Args:
      policy_logps, reference_logps: [B] float summed sequence log-probs (reference:
        constants).
      labels: [B] bool / int / float 0/1, 1 for a desirable completion.
      kl_reference_point: [] float z0 (e.g. ``kto_reference_point``).
      beta: β > 0.
      desirable_weight, undesirable_weight: w_d, w_u > 0 (the paper's λ_D, λ_U; KTO
        suggests w_d·n_d / (w_u·n_u) in [1, 4/3]).

    Returns:
      (loss, metrics) with ``kl`` (z0), ``chosen_reward`` / ``rejected_reward`` (mean
      β·r over desirable / undesirable examples, 0 when there are none), ``reward_margin``
      (their difference), ``reward_accuracy`` (fraction on the right side of z0:
      r > z0 for desirable, r < z0 for undesirable, ½ at r = z0) and
      ``desirable_fraction``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if w <= 0:
            raise ValueError(f"{name} must be > 0, got {w}")
    check_rank(1, policy_logps=policy_logps)
    check_same_shape(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
    check_mask(labels=labels)
    check_rank(0, hint="[] (a scalar)", kl_reference_point=kl_reference_point)
    desirable = jnp.asarray(labels) > 0
    z0 = jax.lax.stop_gradient(upcast(kl_reference_point))
    logratio = upcast(policy_logps) - jax.lax.stop_gradient(upcast(reference_logps))
    losses = jnp.where(desirable,
                       desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio - z0))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logratio))))
    reward = jax.lax.stop_gradient(beta * logratio)
    d = desirable.astype(jnp.float32)
    n_d, n_u = jnp.sum(d), jnp.sum(1.0 - d)
    chosen = jnp.where(n_d > 0, jnp.sum(d * reward) / jnp.maximum(n_d, 1.0), 0.0)
    rejected = jnp.where(n_u > 0, jnp.sum((1.0 - d) * reward) / jnp.maximum(n_u, 1.0), 0.0)
    logratio_c = jax.lax.stop_gradient(logratio)
    z0_b = jnp.broadcast_to(z0, logratio_c.shape)
    right = jnp.where(desirable, tie_half_accuracy(logratio_c, z0_b), tie_half_accuracy(z0_b, logratio_c))
    metrics = {
        "kl": z0,
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": jnp.mean(right),
        "desirable_fraction": jnp.mean(d),
    }
    return jnp.mean(losses), metrics
