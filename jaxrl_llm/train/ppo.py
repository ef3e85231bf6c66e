"""RLHF with PPO: policy, frozen reference, reward (a reward model or a reward function),
critic, KL-shaped token rewards and GAE.

Per step: sample responses for B prompts → score them (reward model at the last valid
token of prompt + response, and/or ``reward_fn``; optional running normalisation and
clipping) → policy / reference log-probs and critic values on the rollout → per-token
KL to the reference (``ops.kl_penalty``, k1 by default) → shaped token rewards
(``ops.shape_token_rewards``: −β·KL per token, score on the last valid token) → GAE
(``ops.gae``) → whitened advantages (``ops.masked_whiten``) → ``ppo_epochs`` passes of
minibatch updates of the clipped policy loss, the clipped value loss and an entropy
bonus → β update (fixed, linear schedule or adaptive controller).

Options: KL in the loss instead of in the reward (``kl_in_reward=False``), the KL reward
summed over the response and charged at its last token instead of per token
(``kl_reward_placement="sequence"``), a replay buffer of earlier rollouts mixed into the
update batches, a critic on its own backbone (default: a copy of the policy's backbone)
or a value head shared with the policy.

Mesh (``config.mesh``): the four models share one device mesh and one set of sharding
rules (``parallel.Placement``). Policy and critic are trainable (params and optimizer
state sharded), reference and reward model frozen (params only). Sampling, reward-model
scores, log-probs, values, GAE targets and updates run with their rows split over the
batch axes (data × fsdp); scores, the reward normaliser, the KL controller, metrics and
the replay buffer are host work on whole-batch copies (``Placement.to_host``), so every
mesh sees the same numbers in the same order.

Asynchronous and disaggregated sampling (``train.async_sampling``, as in GRPO): with
``max_staleness`` k > 0 a sampler thread samples (and scores with the reward function or
the environment) up to k steps ahead with the policy of the step at which it started; the
update's clipped ratio is against the trainer's own policy, whose log-probs are recomputed
every step anyway (decoupled PPO's proximal policy), and ``tis_cap`` corrects for the
older behaviour policy with importance weights on the policy-gradient term. With
``placement="disaggregated"`` the sampler decodes on a sub-mesh of its own
(``sampler_mesh``) and the trainer (policy, reference, critic, reward model, updates) on the
rest; the weights move to the sampler by one resharding ``jax.device_put`` per step. The
reward model stays on the trainer's devices and scores in the trainer's thread.

Everything a resumed run needs is in the checkpointed state: policy and critic params,
their optimizer states, the RNG key, β, the reward normaliser's running moments and the
replay buffer; the prompt loader's position is in the checkpoint's meta.

Shapes: B prompts per step, G samples per prompt, N = B·G rows, P prompt length (fixed
to ``max_prompt_len``), T = ``max_new_tokens``, L = P + T, D model dim.

References:
  Schulman et al. 2017, PPO, https://arxiv.org/abs/1707.06347
  Ziegler et al. 2019, Fine-Tuning LMs from Human Preferences, https://arxiv.org/abs/1909.08593
  Stiennon et al. 2020, Learning to summarize from human feedback, https://arxiv.org/abs/2009.01325
  Ouyang et al. 2022, InstructGPT, https://arxiv.org/abs/2203.02155
  Huang et al. 2024, The N+ implementation details of RLHF with PPO, https://arxiv.org/abs/2403.17031
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.prompts import OVERLONG_PROMPT_POLICIES, PromptBatch, PromptLoader
from jaxrl_llm.data.tokenization import decode_ids, eos_id, pad_id
from jaxrl_llm.models.heads import ScalarHeadModel, ValueModel
from jaxrl_llm.models.layer_stacking import is_stacked
from jaxrl_llm.ops.policy_losses import PPO_TOKEN_MEAN_METRICS, VALUE_TOKEN_MEAN_METRICS
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.parallel.sharding import create_sharded
from jaxrl_llm.rollout.multiturn import generate_episodes
from jaxrl_llm.rollout.sampler import Rollout, apply_stop_strings, generate
from jaxrl_llm.train.async_sampling import SamplePipeline, check_async_fields, make_role_placements
from jaxrl_llm.train.episodes import check_episode_fields, resolve_env, response_width
from jaxrl_llm.train.guard import apply_if_finite
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, init_lora
from jaxrl_llm.train.microbatch import accumulated_value_and_grad, row_weights
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.train.policy import (
    check_tokenizer_fits,
    placed_model,
    response_logprobs,
    split_model,
)
from jaxrl_llm.train.scoring import RewardScorer, resolve_reward, validate_reward_fields
from jaxrl_llm.train.validation import (
    check_int_field,
    check_policy_clip,
    check_positive_ints,
    check_real,
    check_rollout_correction,
    check_sampling,
)

KL_SCHEDULES = ("fixed", "linear", "adaptive")
KL_REWARD_PLACEMENTS = ("token", "sequence")
REWARD_EPS = 1e-8  # std floor of the running reward normaliser


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Configuration of the PPO trainer.

    Attributes:
      run, optim: loop and (policy) optimizer settings.
      critic_optim: optimizer of the critic (None: same as ``optim``).
      prompts_per_step: B prompts sampled per step.
      samples_per_prompt: G responses per prompt (N = B·G rows per step).
      max_prompt_len: prompts are padded to this; longer ones follow ``overlong_prompts``.
      overlong_prompts: "error" | "truncate_left" | "drop" (see ``data.PromptLoader``).
      max_new_tokens: T, the response budget.
      temperature, top_k, top_p: sampling options.
      stop_token_ids: extra stop ids; the tokenizer's eos is always one.
      stop_strings: responses end after the token completing any of these strings.
      gamma, lam: GAE discount γ and λ.
      whiten_advantages: whiten advantages over the batch's valid tokens.
      clip_low, clip_high, dual_clip: PPO ratio clipping (``ops.ppo_policy_loss``).
      value_clip: value-loss clip range (None: unclipped).
      vf_coef: weight of the value loss.
      entropy_coef: weight of the entropy bonus.
      loss_agg: ``aggregate_loss`` mode of every per-token loss.
      ppo_epochs: passes over each batch.
      minibatches: minibatches per pass (each one optimizer update).
      env, max_turns, max_total_tokens: multi-turn episodes (``GRPOConfig``'s fields):
        the environment's step rewards sit on the last token of the message each answers
        and GAE runs across the masked observation tokens.
      microbatches: run each minibatch update as this many forward/backward passes whose
        gradients add up to the minibatch's exactly (``train.microbatch``, weighted by
        loss_agg): less activation memory, the same update.
      kl_kind: KL estimator (``ops.KL_KINDS``; "k1" as in InstructGPT, "k3" selectable).
      kl_coef: β (the initial β for "linear" and "adaptive").
      kl_schedule: "fixed"; "linear" (β from kl_coef to kl_coef_final over the run);
        "adaptive" (Ziegler et al. controller toward kl_target with kl_horizon).
      kl_coef_final: β at the last step of the "linear" schedule.
      kl_target, kl_horizon: adaptive controller target (per-sequence KL) and horizon
        (in samples).
      kl_in_reward: True: −β·KL is part of the token rewards (InstructGPT); False: the KL
        estimate of the current policy is a loss term β·KL instead (GRPO-style).
      kl_reward_placement: where the KL reward goes (with ``kl_in_reward``): "token"
        (r_t = −β·KL_t, r_last += score; InstructGPT) or "sequence" (r_last = score −
        β·Σ_t KL_t, other r_t = 0). The return from the first token is the same; what
        GAE credits to each token differs (see ``compute_ppo_targets``).
      shared_critic: the critic is a value head on the policy's own hidden states (one
        backbone, one optimizer) instead of a separate value model.
      reward_norm: normalise scores with running mean / std over all scores seen so far.
      reward_clip: clip (normalised) scores to [−c, c] (None: no clip).
      missing_eos_penalty: subtracted from the score of responses cut at
        max_new_tokens without a stop token (None: off).
      reward_default: score for samples ``reward_fn`` failed on (an exception or NaN;
        None: the sample is left out of the loss, as when it returns None).
      reward_funcs, reward_weights, max_unscored_frac: the reward functions by spec, their
        weights and the health limit, as in ``GRPOConfig`` (``train.scoring``).
      replay_capacity: rows kept in a replay buffer of earlier rollouts (0: off).
      replay_rows: rows drawn from the buffer and added to each update batch (once the
        buffer holds that many).
      logprob_chunk_size: tokens per chunk of ``logprobs_from_hidden``.
      lora: train low-rank adapters of the policy instead of all its weights (rank 0:
        off); the default reference is then the frozen base model.
      tis_cap: rollout correction for the sampler/trainer mismatch (None: off): the
        policy-gradient term of each sampled token is weighted by the importance weight
        π_train / π_rollout (the trainer's recomputed log-prob over the sampler's raw
        one), capped at C (``tis_mode="truncate"``, TIS), or tokens whose ratio leaves
        [tis_lower, C] are rejected from the loss (``"mask"``, MIS; rejected tokens leave
        the policy, value and entropy terms); ``ops.rollout_correction``. The value loss
        and the KL are not weighted.
      tis_level: "token", "sequence" (product of the ratios) or "geometric" (their
        per-token geometric mean) — the ratio the bound applies to.
      tis_mode: "truncate" or "mask".
      tis_lower: the lower rejection bound (mode "mask"; None: 1 / tis_cap).
      tis_veto: reject a whole response holding a token ratio below this (None: off).
      max_staleness: asynchronous sampling: a sampler thread samples and scores (reward
        function or environment) up to this many policy versions ahead of the update,
        overlapping them with training (0: synchronous). The clipped ratio is against the
        trainer's current policy, whose log-probs (and values, KL and GAE targets) are
        recomputed on every batch (decoupled PPO); set ``tis_cap`` to correct for the
        older behaviour policy. The sampler then records its raw log-probs and the run
        logs ``rollout_mismatch_abs`` (mean |log π_train − log π_rollout|). Metrics
        ``staleness`` (versions between sampling and training) and ``time_sampler``.
        Sampling never runs across a checkpoint, so resume stays exact. A reward model
        scores in the trainer's thread, on the trainer's devices.
      mesh: device mesh (data × fsdp × tensor) of all four models. prompts_per_step
        (sampling), prompts_per_step · samples_per_prompt (scoring, log-probs, values)
        and the rows of one update forward/backward (that / (minibatches · microbatches),
        and with replay (that + replay_rows) / (minibatches · microbatches)) must divide
        by data × fsdp. With ``placement="disaggregated"`` it shapes the trainer's
        devices (all rows but prompts_per_step).
      placement: "colocated" (sampler and trainer share the mesh and take turns) or
        "disaggregated" (the sampler runs on a sub-mesh of its own, ``sampler_mesh``;
        policy, reference, critic and reward model stay on the trainer's; after each
        update the policy weights move to the sampler by one resharding device_put). See
        ``jaxrl_llm.train.async_sampling``.
      sampler_mesh: the sampler's mesh when disaggregated: ``num_devices`` (default half
        of the devices, taken from the end) and its data × fsdp × tensor shape;
        prompts_per_step must divide by its data × fsdp.
      reward_workers: threads per reward function scoring slices of a batch
        concurrently (for verifiers that wait on a subprocess, sandbox or server).
    """

    run: RunConfig = RunConfig(output_dir="runs/ppo")
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    critic_optim: OptimConfig | None = None
    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    max_prompt_len: int = 64
    overlong_prompts: str = "error"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    loss_agg: str = "token_mean"
    ppo_epochs: int = 4
    minibatches: int = 1
    kl_kind: str = "k1"
    kl_coef: float = 0.05
    kl_schedule: str = "fixed"
    kl_coef_final: float | None = None
    kl_target: float = 6.0
    kl_horizon: float = 10_000.0
    kl_in_reward: bool = True
    kl_reward_placement: str = "token"
    shared_critic: bool = False
    reward_norm: bool = False
    reward_clip: float | None = None
    missing_eos_penalty: float | None = None
    reward_default: float | None = None
    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    max_unscored_frac: float = 0.5
    replay_capacity: int = 0
    replay_rows: int = 0
    logprob_chunk_size: int = 1024
    lora: LoRAConfig = LoRAConfig()
    tis_cap: float | None = None
    tis_level: str = "token"
    tis_mode: str = "truncate"
    tis_lower: float | None = None
    tis_veto: float | None = None
    max_staleness: int = 0
    env: str = ""
    max_turns: int = 1
    max_total_tokens: int | None = None
    microbatches: int = 1
    mesh: MeshConfig = MeshConfig()
    placement: str = "colocated"
    sampler_mesh: MeshConfig = MeshConfig()
    reward_workers: int = 1

    def __post_init__(self):
        check_async_fields(self)
        check_int_field("max_staleness", self.max_staleness, 0,
                        why="policy versions the sampler may run ahead of the update; 0: synchronous")
        check_real("tis_cap", self.tis_cap, low=0, low_open=True, optional=True,
                   why="the cap C of the truncated importance weights min(w, C); None turns it off")
        check_rollout_correction(self)
        check_positive_ints(self, ("prompts_per_step", "samples_per_prompt", "max_prompt_len", "max_new_tokens",
                                   "ppo_epochs", "minibatches", "logprob_chunk_size", "microbatches"))
        if self.overlong_prompts not in OVERLONG_PROMPT_POLICIES:
            raise ValueError(f"overlong_prompts must be one of {OVERLONG_PROMPT_POLICIES}, got {self.overlong_prompts!r}")
        if self.loss_agg not in ops.AGGREGATION_MODES:
            raise ValueError(f"loss_agg must be one of {ops.AGGREGATION_MODES}, got {self.loss_agg!r}")
        if self.kl_kind not in ops.KL_KINDS:
            raise ValueError(f"kl_kind must be one of {ops.KL_KINDS}, got {self.kl_kind!r}")
        if self.kl_schedule not in KL_SCHEDULES:
            raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {self.kl_schedule!r}")
        if self.kl_reward_placement not in KL_REWARD_PLACEMENTS:
            raise ValueError(f"kl_reward_placement must be one of {KL_REWARD_PLACEMENTS}, "
                             f"got {self.kl_reward_placement!r}")
        if self.kl_reward_placement != "token" and not self.kl_in_reward:
            raise ValueError(f"kl_reward_placement={self.kl_reward_placement!r} places the KL in the reward; "
                             "it needs kl_in_reward=True")
        check_real("kl_coef", self.kl_coef, low=0, why="β of the KL penalty; 0 turns it off")
        if self.kl_schedule == "linear" and self.kl_coef_final is None:
            raise ValueError(f'kl_schedule="linear" needs kl_coef_final >= 0, got {self.kl_coef_final}')
        check_real("kl_coef_final", self.kl_coef_final, low=0, optional=True,
                   why='β at the last step of kl_schedule="linear"')
        if self.kl_coef_final is not None and self.kl_schedule != "linear":
            raise ValueError(f"kl_coef_final={self.kl_coef_final} applies to kl_schedule='linear' only; "
                             f"kl_schedule={self.kl_schedule!r} ignores it (set kl_coef_final=None)")
        if self.kl_schedule == "adaptive":
            if self.kl_coef <= 0:
                raise ValueError(f'kl_schedule="adaptive" needs kl_coef > 0 (it scales β), got {self.kl_coef}')
            check_real("kl_target", self.kl_target, low=0, low_open=True,
                       why="the per-sequence KL the adaptive controller steers towards")
            check_real("kl_horizon", self.kl_horizon, low=0, low_open=True,
                       why="the adaptive controller's horizon in samples")
        check_real("gamma", self.gamma, low=0, high=1, why="the GAE discount")
        check_real("lam", self.lam, low=0, high=1, why="the GAE λ")
        check_sampling(self)
        check_policy_clip(self.clip_low, self.clip_high, self.dual_clip)
        check_real("value_clip", self.value_clip, low=0, low_open=True, optional=True, finite=False,
                   why="the value-loss clip range; None: unclipped")
        check_real("reward_clip", self.reward_clip, low=0, low_open=True, optional=True, finite=False,
                   why="scores are clipped to [-reward_clip, reward_clip]; None: no clip")
        for name in ("vf_coef", "entropy_coef"):
            check_real(name, getattr(self, name), low=0, why="a loss weight; 0 turns the term off")
        check_real("missing_eos_penalty", self.missing_eos_penalty, low=0, optional=True,
                   why="subtracted from the score of responses cut without a stop token; None turns it off")
        check_real("reward_default", self.reward_default, optional=True,
                   why="the score of samples the reward function failed on")
        validate_reward_fields(self.reward_funcs, self.reward_weights, self.max_unscored_frac)
        check_episode_fields(self)
        if self.env:
            single = {k: v for k, v in (("reward_norm", self.reward_norm), ("reward_clip", self.reward_clip),
                                        ("missing_eos_penalty", self.missing_eos_penalty),
                                        ("stop_strings", self.stop_strings)) if v}
            if single:
                raise ValueError(f"{sorted(single)} act on single-response scores; with env={self.env!r} the "
                                 "environment's step rewards are used as they are (turn them off)")
        check_int_field("replay_capacity", self.replay_capacity, 0, why="rows of the replay buffer; 0 turns it off")
        check_int_field("replay_rows", self.replay_rows, 0)
        if self.replay_capacity < 0 or self.replay_rows < 0 or self.replay_rows > self.replay_capacity:
            raise ValueError(f"need 0 <= replay_rows <= replay_capacity, got replay_rows={self.replay_rows}, "
                             f"replay_capacity={self.replay_capacity}")
        for rows in {self.num_rows, self.num_rows + self.replay_rows}:
            if rows % self.minibatches:
                raise ValueError(f"update batch of {rows} rows (prompts_per_step * samples_per_prompt"
                                 f"{' (+ replay_rows)' if rows != self.num_rows else ''}) must be divisible "
                                 f"by minibatches={self.minibatches}")
            if (rows // self.minibatches) % self.microbatches:
                raise ValueError(f"minibatch of {rows // self.minibatches} rows must be divisible by "
                                 f"microbatches={self.microbatches}")

    @property
    def num_rows(self) -> int:
        """N = prompts_per_step · samples_per_prompt rollouts per step."""
        return self.prompts_per_step * self.samples_per_prompt

    def mesh_rows(self) -> dict[str, int]:
        """``{config fields: row count}`` of every batch split over the mesh's batch axes:
        the prompts when sampling, the N rollouts when scoring and evaluating, and each
        update minibatch (N rows, or N + replay_rows once the replay buffer is full).
        Disaggregated, the prompts split over ``sampler_mesh`` and the rest over ``mesh``
        (``role_rows``)."""
        n = "prompts_per_step * samples_per_prompt"
        split, parts = ("minibatches", self.minibatches) if self.microbatches == 1 else (
            "(minibatches * microbatches)", self.minibatches * self.microbatches)
        rows = {"prompts_per_step": self.prompts_per_step, n: self.num_rows,
                f"{n} / {split}": self.num_rows // parts}
        if self.replay_rows:
            rows[f"({n} + replay_rows) / {split}"] = (self.num_rows + self.replay_rows) // parts
        return rows

    def role_rows(self) -> tuple[dict[str, int], dict[str, int]]:
        """(trainer rows, sampler rows) of ``mesh_rows`` for ``make_role_placements``:
        the sampler splits the prompts; colocated, the trainer's mesh is the sampler's
        and is checked against every row count."""
        rows = self.mesh_rows()
        sampler = {"prompts_per_step": rows["prompts_per_step"]}
        if self.placement == "colocated":
            return rows, sampler
        return {k: v for k, v in rows.items() if k not in sampler}, sampler

    @property
    def records_behaviour_logprobs(self) -> bool:
        """The sampler records its raw log-probs (rollout correction, or asynchronous
        sampling: the mismatch is then logged)."""
        return self.tis_cap is not None or self.max_staleness > 0

    def kl_coef_at(self, step: int) -> float:
        """β of the "fixed" / "linear" schedules at ``step`` (the adaptive β is state)."""
        if self.kl_schedule != "linear":
            return self.kl_coef
        frac = step / max(self.run.total_steps - 1, 1)
        return self.kl_coef + (self.kl_coef_final - self.kl_coef) * frac


# ---------------------------------------------------------------------------- numpy-side pieces


def update_running_moments(stats: dict, x: np.ndarray) -> dict:
    """Chan et al. parallel update of (count, mean, m2) with a batch ``x`` [n].

    Stored as float32 arrays so that a run restored from a checkpoint continues with
    bit-identical values.
    """
    x = np.asarray(x, np.float64)
    n_a, mean_a, m2_a = float(stats["count"]), float(stats["mean"]), float(stats["m2"])
    n_b = x.size
    if n_b == 0:
        return stats
    mean_b = float(x.mean())
    m2_b = float(((x - mean_b) ** 2).sum())
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2 = m2_a + m2_b + delta**2 * n_a * n_b / n
    return {k: np.asarray(v, np.float32) for k, v in (("count", n), ("mean", mean), ("m2", m2))}


def normalize_scores(scores: np.ndarray, stats: dict) -> np.ndarray:
    """(s − running mean) / running std (unbiased; std floored by REWARD_EPS)."""
    count = float(stats["count"])
    var = float(stats["m2"]) / max(count - 1.0, 1.0)
    return ((scores - float(stats["mean"])) / np.sqrt(var + REWARD_EPS)).astype(np.float32)


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
    """1 − Var(R − V) / Var(R) over valid tokens (1: perfect critic, ≤ 0: no better than
    a constant). 0 when the returns have no variance."""
    m = np.asarray(mask) > 0
    if m.sum() < 2:
        return 0.0
    r, v = np.asarray(returns)[m], np.asarray(values)[m]
    var_r = r.var()
    return float(1.0 - (r - v).var() / var_r) if var_r > 0 else 0.0


def compute_ppo_targets(
    scores: jax.Array,
    logp: jax.Array,
    ref_logp: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    beta: float,
    kl_kind: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    kl_reward_placement: str = "token",
    token_scores: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The PPO targets of a rollout: KL → shaped rewards → GAE → whitened advantages.

      kl_t = kl_penalty(logp_t, ref_logp_t, kl_kind)
      "token":    r_t = −β·kl_t (+ score on the last valid token)     (shape_token_rewards)
      "sequence": r_t = 0,  r_last = score − β·Σ_t kl_t
      A, R = gae(r, V, γ, λ);  A ← masked_whiten(A) if whiten

    The two placements give every response the same total reward; they differ by the
    potential Φ_t = −β·Σ_{u<t} kl_u (potential-based shaping, Ng et al. 1999). A critic
    that tracks the KL already spent gives identical advantages under both; a critic
    that cannot (the usual case) gets the KL of token t only through the last token's
    δ, λ-discounted back to t, under "sequence".

    Args:
      scores: [N] float32 sequence scores.
      logp, ref_logp: [N, T] float32 policy / reference log-probs of the sampled tokens.
      values: [N, T] float32 critic values V(s_t).
      mask: [N, T] 1.0 on valid response tokens.
      beta: KL coefficient in the reward (0 when the KL is a loss term instead).
      kl_reward_placement: one of KL_REWARD_PLACEMENTS.
      token_scores: [N, T] float32 rewards at given tokens, added to the shaped rewards
        (multi-turn episodes: each step's reward at the end of its message), or None.

    Returns:
      dict of [N, T] float32 arrays ``kl``, ``rewards``, ``advantages``, ``returns``.
    """
    if kl_reward_placement not in KL_REWARD_PLACEMENTS:
        raise ValueError(f"kl_reward_placement must be one of {KL_REWARD_PLACEMENTS}, got {kl_reward_placement!r}")
    mask = jnp.asarray(mask, jnp.float32)
    kl = ops.kl_penalty(logp, ref_logp, kl_kind, mask=mask)
    if kl_reward_placement == "sequence":
        # Sum the KL into the score; β = 0 then puts only the score, on the last valid token.
        rewards = ops.shape_token_rewards(scores - beta * kl.sum(axis=-1), kl, mask, 0.0)
    else:
        rewards = ops.shape_token_rewards(scores, kl, mask, beta)
    if token_scores is not None:
        rewards = rewards + jnp.asarray(token_scores, jnp.float32) * mask
    advantages, returns = ops.gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = ops.masked_whiten(advantages, mask)
    return {"kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns}


_targets_jit = jax.jit(compute_ppo_targets,
                       static_argnames=("kl_kind", "gamma", "lam", "whiten", "kl_reward_placement"))


# ---------------------------------------------------------------------------- models


def value_head_init(dim: int) -> jax.Array:
    """Initial shared value head [D, 1]: zeros (values start at 0)."""
    return jnp.zeros((dim, 1), jnp.float32)


def make_critic(policy: nnx.Module, *, seed: int = 0, placement: Placement | None = None) -> ValueModel:
    """A ValueModel with a copy of the policy's backbone weights and a zero value head.

    With a ``placement`` the critic is built directly in its sharding (no whole copy of
    the backbone on one device) and returned placed by the rules."""
    # the policy's decoder layout (stacked or per layer), so its state drops in
    build = lambda: ValueModel(policy.config, rngs=nnx.Rngs(seed), scan_layers=is_stacked(policy))  # noqa: E731
    critic = build() if placement is None else create_sharded(build, placement.mesh, placement.rules)
    nnx.update(critic.model, jax.tree.map(jnp.array, nnx.state(policy.model, nnx.Param)))
    critic.score[...] = jnp.zeros_like(critic.score[...])
    return critic if placement is None else placement.place(critic)


def _as_critic(critic: Any, placement: Placement) -> ScalarHeadModel:
    """A per-token value model on the run's mesh (a path is loaded straight into it)."""
    if isinstance(critic, ScalarHeadModel):
        if critic.pool != "none":
            raise ValueError(f'critic must give per-token values (pool="none", e.g. ValueModel), got pool={critic.pool!r}')
    elif not isinstance(critic, str):
        raise ValueError(f"critic must be a ValueModel or a local checkpoint path, got {type(critic).__name__}")
    return placed_model(critic, placement, kind="value")


def _as_reward_model(reward_model: Any, placement: Placement) -> ScalarHeadModel:
    """A sequence-scoring model on the run's mesh (a path is loaded straight into it)."""
    if isinstance(reward_model, ScalarHeadModel):
        if reward_model.pool == "none":
            raise ValueError('reward_model must pool to one score per sequence (pool "last" or "mean"), got "none"')
    elif not isinstance(reward_model, str):
        raise ValueError("reward_model must be a RewardModel or a local checkpoint path, "
                         f"got {type(reward_model).__name__}")
    return placed_model(reward_model, placement, kind="reward")


# ---------------------------------------------------------------------------- jitted pieces
#
# The jitted functions live at module level with the model graphs, the optimizer and the
# loss options as static arguments, so a second run with the same shapes and options
# (a resumed run, another β) reuses the compiled code.


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The static options of the PPO loss (a hashable subset of PPOConfig)."""

    prompt_len: int
    chunk_size: int = 1024
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    loss_agg: str = "token_mean"
    kl_in_reward: bool = True
    kl_kind: str = "k1"
    lora: LoRAConfig = LoRAConfig()
    microbatches: int = 1
    tis: bool = False  # the batch holds tis_weight [N, T], the policy-gradient term's weights

    @classmethod
    def from_config(cls, config: PPOConfig) -> "LossOptions":
        return cls(config.max_prompt_len, config.logprob_chunk_size, config.clip_low, config.clip_high,
                   config.dual_clip, config.value_clip, config.vf_coef, config.entropy_coef, config.loss_agg,
                   config.kl_in_reward, config.kl_kind, config.lora, config.microbatches, config.tis_cap is not None)


def _forward(params, rests, tokens, full_mask, graphs, opts: LossOptions):
    """(logp [N, T], entropy [N, T], values [N, T]) of the current policy and critic."""
    p, chunk = opts.prompt_len, opts.chunk_size
    policy_graph, critic_graph = graphs
    policy_params = apply_lora(rests[2], params["policy"], opts.lora) if opts.lora.enabled else params["policy"]
    policy = nnx.merge(policy_graph, policy_params, rests[0])
    if critic_graph is None:  # shared: value head on the policy's hidden states
        out = policy.forward(tokens, attention_mask=full_mask, return_hidden=True)
        hidden = out.hidden[:, p - 1 : -1]
        hidden = jnp.where(full_mask[:, p:, None] > 0, hidden, jnp.zeros((), hidden.dtype))
        logp, entropy = ops.logprobs_from_hidden(hidden, policy.unembed, tokens[:, p:], chunk_size=chunk,
                                                 mask=full_mask[:, p:])
        head = params["critic"]["value_head"]
        values = jnp.einsum("btd,do->bto", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)[..., 0]
    else:
        out = response_logprobs(policy, tokens, full_mask, p, chunk_size=chunk)
        logp, entropy = out.logprobs, out.entropy
        critic = nnx.merge(critic_graph, params["critic"], rests[1])
        values = critic.forward(tokens, attention_mask=full_mask).values[:, p - 1 : -1]
    return logp, entropy, values.astype(jnp.float32)


def ppo_loss(params, batch, rests, graphs, opts: LossOptions):
    """Clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy
    (+ β · KL(π‖π_ref) when the KL is a loss term, ``kl_in_reward=False``).

    ``batch`` holds tokens [N, L], full_mask [N, L], mask [N, T], old_logp [N, T],
    old_values [N, T], advantages [N, T], returns [N, T], ref_logp [N, T] and the scalar
    kl_coef; with ``opts.tis`` also tis_weight [N, T], the rollout-correction weights
    (``ops.rollout_correction``) by which each token's policy-gradient term is scaled
    (as the advantage: the weights are ≥ 0, so max(−A·w·ρ, −A·w·clip(ρ)) = w·l_t); the
    value loss, the entropy bonus and the KL are not weighted. Old log-probs / values,
    advantages, weights, returns and reference log-probs are constants (stop-gradient
    inside the ops).

    Returns:
      (loss, metrics).
    """
    logp, entropy, values = _forward(params, rests, batch["tokens"], batch["full_mask"], graphs, opts)
    mask = batch["mask"]
    advantages = batch["advantages"] * batch["tis_weight"] if opts.tis else batch["advantages"]
    pg_loss, pg_metrics = ops.ppo_policy_loss(logp, batch["old_logp"], advantages, mask, opts.clip_low,
                                              opts.clip_high, opts.dual_clip, opts.loss_agg)
    vf_loss, vf_metrics = ops.value_loss(values, batch["old_values"], batch["returns"], mask, opts.value_clip,
                                         opts.loss_agg)
    entropy_loss = ops.aggregate_loss(entropy, mask, opts.loss_agg)
    loss = pg_loss + opts.vf_coef * vf_loss - opts.entropy_coef * entropy_loss
    metrics = {"pg_loss": pg_loss, "vf_loss": vf_loss, **pg_metrics, **vf_metrics,
               "entropy": jax.lax.stop_gradient(ops.masked_mean(entropy, mask))}
    if not opts.kl_in_reward:
        kl = ops.kl_penalty(logp, jax.lax.stop_gradient(batch["ref_logp"]), opts.kl_kind, mask=mask)
        kl_loss = ops.aggregate_loss(kl, mask, opts.loss_agg)
        loss = loss + batch["kl_coef"] * kl_loss
        metrics["kl_loss"] = kl_loss
    return loss, metrics


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnames=("graphs", "tx", "opts", "placement"))
def _update_step(params, opt_state, batch, rests, *, graphs, tx, opts, placement: Placement):
    """One optimizer update of policy and critic on a minibatch whose rows are split over
    the mesh; the new params and optimizer state keep their sharding."""
    token_means = PPO_TOKEN_MEAN_METRICS + VALUE_TOKEN_MEAN_METRICS + ("entropy",)
    (loss, metrics), grads = accumulated_value_and_grad(
        lambda p, b: ppo_loss(p, b, rests, graphs, opts), params, batch, row_weights(batch["mask"], opts.loss_agg),
        opts.microbatches, dict.fromkeys(token_means, row_weights(batch["mask"], "token_mean")))
    metrics["grad_norm"] = _global_norm(grads["policy"])
    metrics["critic_grad_norm"] = _global_norm(grads["critic"])
    params, opt_state, finite = apply_if_finite(tx, params, opt_state, grads, loss)
    params, opt_state = placement.constrain((params, opt_state))
    return params, opt_state, finite, {"loss": loss, **metrics}


@functools.partial(jax.jit, static_argnames=("graphs", "opts"))
def _evaluate(params, ref_params, rests, tokens, full_mask, *, graphs, opts):
    """Rollout-time forward: policy log-probs / entropy, values, reference log-probs."""
    logp, entropy, values = _forward(params, rests, tokens, full_mask, graphs, opts)
    ref = nnx.merge(graphs[0], ref_params, rests[0])
    ref_logp = response_logprobs(ref, tokens, full_mask, opts.prompt_len, chunk_size=opts.chunk_size).logprobs
    return logp, entropy, values, ref_logp


@functools.partial(jax.jit, static_argnames=("graph",))
def _score_jit(state, tokens, full_mask, *, graph):
    return nnx.merge(graph, state)(tokens, attention_mask=full_mask)


def _make_reward_model_fn(reward_model: ScalarHeadModel, placement: Placement):
    """``(tokens [N, L], full_mask [N, L]) -> scores [N]`` (numpy, whole batch): the
    reward model's forward with its rows split over the mesh."""
    graph, state = nnx.split(reward_model)

    def score(tokens, full_mask):
        with placement.context():
            scores = _score_jit(state, *placement.rows((tokens, full_mask)), graph=graph)
        return placement.to_host(scores)

    return score


@functools.lru_cache(maxsize=16)
def _optimizer(optim: OptimConfig, critic_optim: OptimConfig, total_updates: int) -> optax.GradientTransformation:
    """One optax chain per parameter group ("policy", "critic"); cached so that runs with
    the same settings share compiled updates."""
    return optax.multi_transform(
        {"policy": make_optimizer(optim, total_updates), "critic": make_optimizer(critic_optim, total_updates)},
        lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()},
    )


def _schedule_length(optim: OptimConfig, total_updates: int) -> int:
    """A constant schedule does not depend on the run length (better cache hits)."""
    return 1 if optim.schedule == "constant" else total_updates


# ---------------------------------------------------------------------------- scoring


def score_rollout(
    rollout: Rollout,
    prompts: PromptBatch,
    tokenizer: Any,
    config: PPOConfig,
    *,
    scorer: RewardScorer | None,
    reward_model_fn: Callable | None,
    fn_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw sequence scores [N] (NaN where unscored) and the valid mask [N].

    The reward model scores prompt + response at the last valid token; the reward
    function (``train.scoring``, TRL convention) scores the decoded completion; given
    both, the scores add up. ``fn_scores``: the reward function's scores already
    computed (``reward_fn_scores``, in the sampler thread), used instead of ``scorer``.
    """
    n = rollout.num_rows
    total = np.zeros(n, np.float64)
    if reward_model_fn is not None:
        tokens, full_mask = rollout.full_tokens()
        total += np.asarray(reward_model_fn(tokens, full_mask), np.float64)
    if fn_scores is None and scorer is not None:
        fn_scores = reward_fn_scores(rollout, prompts, tokenizer, config, scorer)
    if fn_scores is not None:
        total += fn_scores
    if config.missing_eos_penalty is not None:
        total -= config.missing_eos_penalty * (~np.asarray(rollout.finished)).astype(np.float64)
    valid = np.isfinite(total)
    return total.astype(np.float32), valid


def reward_fn_scores(rollout: Rollout, prompts: PromptBatch, tokenizer: Any, config: PPOConfig,
                     scorer: RewardScorer) -> np.ndarray:
    """[N] float64 reward-function scores of the decoded completions (NaN where unscored)."""
    toks, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    completions = [decode_ids(tokenizer, toks[i, : lengths[i]].tolist(), skip_special_tokens=True)
                   for i in range(rollout.num_rows)]
    return scorer(prompts.prompts, completions, prompts.columns, config.samples_per_prompt)


# ---------------------------------------------------------------------------- replay buffer


_REPLAY_KEYS = ("tokens", "full_mask", "mask", "old_logp", "old_values", "advantages", "returns", "ref_logp")
_TIS_REPLAY_KEYS = _REPLAY_KEYS + ("tis_weight",)  # with rollout correction: the rows keep their weights


def _empty_replay(capacity: int, length: int, t: int, keys: tuple[str, ...] = _REPLAY_KEYS) -> dict:
    out = {"size": np.zeros((), np.int32), "pos": np.zeros((), np.int32)}
    for k in keys:
        out[k] = np.zeros((capacity, length if k in ("tokens", "full_mask") else t),
                          np.int32 if k in ("tokens", "full_mask") else np.float32)
    return out


def _replay_keys(buffer: dict) -> tuple[str, ...]:
    return _TIS_REPLAY_KEYS if "tis_weight" in buffer else _REPLAY_KEYS


def _replay_push(buffer: dict, batch: dict) -> dict:
    capacity = buffer["tokens"].shape[0]
    n = batch["tokens"].shape[0]
    pos = int(buffer["pos"])
    idx = (pos + np.arange(n)) % capacity
    keys = _replay_keys(buffer)
    out = {k: np.array(buffer[k]) for k in keys}
    for k in keys:
        out[k][idx] = np.asarray(batch[k])
    out["pos"] = np.asarray((pos + n) % capacity, np.int32)
    out["size"] = np.asarray(min(int(buffer["size"]) + n, capacity), np.int32)
    return out


# ---------------------------------------------------------------------------- train


def train(
    config: PPOConfig,
    *,
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[dict],
    reward_model: Any = None,
    reward_fn: Callable | Sequence[Callable | str] | None = None,
    critic: Any = None,
    reference: Any = None,
    env: Callable[[], Any] | None = None,
) -> TrainResult:
    """Trains ``policy`` with PPO against a reward model and/or a reward function.

    Args:
      config: PPOConfig.
      policy: a CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or ``CharTokenizer`` (no pad token: eos is used for
        padding, which is always masked; no eos token: an error).
      prompts: records with a ``prompt`` (string or chat messages) and extra columns
        passed to ``reward_fn`` as keyword lists.
      reward_model: a RewardModel (``ScalarHeadModel`` pooling "last"/"mean") or a local
        checkpoint path (``load_hf(kind="reward")``); it must share the policy's
        tokenizer. It scores prompt + response at the last valid token.
      reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float | None]``, or
        a list of functions / specs weighted by ``config.reward_weights``; None: the
        config's ``reward_funcs`` (if any).
      critic: a ValueModel (own backbone) or a local checkpoint path
        (``load_hf(kind="value")``); default: a copy of the policy's backbone with a zero
        value head. Must be None with ``config.shared_critic``.
      reference: frozen reference model (default: the initial policy).
      env: a multi-turn environment factory (``jaxrl_llm.envs``; None: ``config.env``,
        or single responses when that is empty). Its step rewards replace the reward
        model / function; observation tokens are masked out of every loss term and GAE
        carries over them.

    Models given as objects are moved onto ``config.mesh`` in place (sharded by the
    rules); paths are loaded straight into their sharding.

    Returns:
      TrainResult whose ``model`` is the trained policy, sharded on the mesh; ``history``
      has per-step metrics (reward, kl, kl_coef, entropy, clipfrac, approx_kl,
      explained_variance, ...). The trained critic is ``result.critic`` (attribute added
      on the result): a ValueModel sharded like the policy, or the shared value head
      [D, 1], replicated.
    """
    reward = resolve_reward(reward_fn, config, required=False)
    env_factory = resolve_env(env, config, has_reward=reward_model is not None or reward is not None)
    if env_factory is None and reward_model is None and reward is None:
        raise ValueError("PPO needs a reward: pass reward_model and/or reward_fn (or set config.reward_funcs)")
    if config.shared_critic and critic is not None:
        raise ValueError("shared_critic=True uses a value head on the policy; do not pass a critic")
    check_formats(prompts, "prompt")
    # One mesh for all four models (disaggregated: the sampler decodes on a mesh of its
    # own); every row count split over them is checked here, so a batch that does not fit
    # fails at start naming its config field.
    for m in (policy, reference, reward_model, critic):
        check_tokenizer_fits(m, tokenizer)
    roles = make_role_placements(config, policy, *config.role_rows())
    placement, sampler_placement = roles.trainer, roles.sampler
    model = placed_model(policy, placement)
    pad = pad_id(tokenizer)
    stop_ids = tuple(dict.fromkeys((eos_id(tokenizer), *config.stop_token_ids)))
    loader = PromptLoader(prompts, tokenizer, config.prompts_per_step, seed=config.run.seed,
                          max_prompt_len=config.max_prompt_len, overlong=config.overlong_prompts,
                          padding_side="right", bucket="max")

    # models
    policy_split = split_model(model)
    ref_params = policy_split.params
    if reference is not None:
        ref_split = split_model(placed_model(reference, placement))
        if ref_split.graphdef != policy_split.graphdef:
            raise ValueError("reference must have the policy's architecture (same config); got a different model")
        ref_params = ref_split.params
    if config.shared_critic:
        critic_split = None
        critic_params = {"value_head": value_head_init(model.config.hidden_size)}  # replicated by place below
    else:
        critic_model = (_as_critic(critic, placement) if critic is not None
                        else make_critic(model, seed=config.run.seed, placement=placement))
        critic_split = split_model(critic_model)
        critic_params = critic_split.params
    reward_model_fn = None
    if reward_model is not None:
        rm = _as_reward_model(reward_model, placement)
        if rm.config.vocab_size < model.config.vocab_size:
            raise ValueError(f"reward_model vocab_size={rm.config.vocab_size} < policy vocab_size="
                             f"{model.config.vocab_size}: it must share the policy's tokenizer (wrap a "
                             "differently tokenized reward model in a reward_fn instead)")
        reward_model_fn = _make_reward_model_fn(rm, placement)
    scorer = (RewardScorer(reward, default=config.reward_default, max_unscored_frac=config.max_unscored_frac,
                           workers=config.reward_workers)
              if reward is not None else None)

    # optimizers: one chain per parameter group
    updates_per_step = config.ppo_epochs * config.minibatches
    total_updates = config.run.total_steps * updates_per_step
    critic_optim = config.critic_optim or config.optim
    length = max(_schedule_length(config.optim, total_updates), _schedule_length(critic_optim, total_updates))
    tx = _optimizer(config.optim, critic_optim, length)
    # LoRA: the policy's adapters train; its base weights stay frozen (the default reference).
    frozen = policy_split.params if config.lora.enabled else None
    policy_trainable = (init_lora(policy_split.params, config.lora, jax.random.PRNGKey(config.run.seed + 1))
                        if frozen else policy_split.params)
    full_policy = jax.jit(lambda a, base: apply_lora(base, a, config.lora)) if frozen else (lambda a, base: a)
    params = {"policy": policy_trainable, "critic": critic_params}
    opts = LossOptions.from_config(config)
    graphs = (policy_split.graphdef, None if critic_split is None else critic_split.graphdef)
    rests = (policy_split.rest, None if critic_split is None else critic_split.rest, frozen)

    n_rows, t_len = config.num_rows, response_width(config)
    state = {
        **placement.place({
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.PRNGKey(config.run.seed)),
        }),
        # Host state, read and written by host code every step (same values on every
        # process). The replay buffer stays here too: its rows are cut into minibatches on
        # the host, which `placement.rows` then splits over the mesh, so it costs no
        # device memory and needs no resharding when rows are drawn from it.
        "kl_coef": np.asarray(config.kl_coef, np.float32),
        "reward_stats": {k: np.zeros((), np.float32) for k in ("count", "mean", "m2")},
    }
    tis = config.tis_cap is not None
    replay_keys = _TIS_REPLAY_KEYS if tis else _REPLAY_KEYS
    if config.replay_capacity:
        state["replay"] = _empty_replay(config.replay_capacity, config.max_prompt_len + t_len, t_len, replay_keys)
    loop = TrainLoop(config, config.run, desc="ppo")
    state, start = loop.start(state)
    if "prompt_loader" in loop.meta:
        loader.load_state_dict(loop.meta["prompt_loader"])

    def sample_step(step: int, k_step, current) -> dict:
        """Sampling of one step with the policy ``current`` on the sampler's mesh, scored
        by the reward function (or the environment); runs in the sampler thread when
        max_staleness > 0, so everything it reads or counts is returned, not shared (the
        prompt loader is advanced by this function only). The reward model scores in the
        trainer's thread: it lives on the trainer's devices."""
        t_start = time.perf_counter()
        prompt_batch = next(loader)
        drawn = {"prompt_batch": prompt_batch, "token_scores": None, "episode_metrics": {}, "env_rewards": None,
                 "fn_scores": None}
        if env_factory is not None:  # the environment seed is replayed exactly on resume
            with sampler_placement.context():
                episodes = generate_episodes(
                    current, tokenizer, [prompts[i] for i in prompt_batch.indices], env_factory,
                    max_turns=config.max_turns, max_new_tokens=config.max_new_tokens, max_total_tokens=t_len,
                    num_samples=config.samples_per_prompt, temperature=config.temperature, top_k=config.top_k,
                    top_p=config.top_p, stop_token_ids=stop_ids, pad_token_id=pad, rng=k_step,
                    seed=config.run.seed * 1_000_003 + step, prompt_width=config.max_prompt_len)
            drawn.update(rollout=episodes.rollout, token_scores=episodes.step_rewards,
                         episode_metrics=episodes.summary(), env_rewards=episodes.rewards)
        else:
            with sampler_placement.context():
                rollout = generate(
                    current, prompt_batch.tokens, prompt_batch.mask,
                    max_new_tokens=t_len, num_samples=config.samples_per_prompt, temperature=config.temperature,
                    top_k=config.top_k, top_p=config.top_p, stop_token_ids=stop_ids, pad_token_id=pad, rng=k_step,
                    return_raw_logprobs=config.records_behaviour_logprobs, prompt_bucket=0,
                    mesh=sampler_placement.mesh,
                )
            rollout = apply_stop_strings(sampler_placement.to_host(rollout), tokenizer, config.stop_strings)
            drawn["rollout"] = rollout
            if scorer is not None:
                drawn["fn_scores"] = reward_fn_scores(rollout, prompt_batch, tokenizer, config, scorer)
        drawn.update(scorer_metrics=scorer.step_metrics() if scorer is not None else {},
                     loader_state=loader.state_dict(), seconds=time.perf_counter() - t_start)
        return drawn

    # the sampler's policy: the trainer's weights moved to the sampler's mesh (a resharding
    # device_put when disaggregated; the same arrays when colocated)
    pipeline = SamplePipeline(sample_step, config, roles, policy_split, start=start, rng=state["rng"],
                              name="ppo-sampler")

    try:
        for step in range(start, config.run.total_steps):
            t0 = time.perf_counter()
            params = state["params"]
            beta = float(state["kl_coef"]) if config.kl_schedule == "adaptive" else config.kl_coef_at(step)

            # sample (each sampler device decodes its own prompt rows; the rollout comes back
            # whole) and score with the reward function / environment: up to max_staleness
            # steps ahead, in the sampler thread
            drawn, version, rng = pipeline.get(
                step, lambda p=params["policy"]: full_policy(p, frozen))
            rollout, prompt_batch, token_scores = drawn["rollout"], drawn["prompt_batch"], drawn["token_scores"]
            t_sample = time.perf_counter() - t0

            # score (episodes: the step rewards, placed on their tokens below; raw = their sum;
            # the reward model runs here, on the trainer's devices)
            if env_factory is not None:
                raw, valid = drawn["env_rewards"].astype(np.float64), np.ones(n_rows, bool)
            else:
                raw, valid = score_rollout(rollout, prompt_batch, tokenizer, config, scorer=None,
                                           reward_model_fn=reward_model_fn, fn_scores=drawn["fn_scores"])
            reward_stats = state["reward_stats"]
            scores = np.where(valid, raw, 0.0).astype(np.float32)
            if config.reward_norm and valid.any():
                reward_stats = update_running_moments(reward_stats, raw[valid])
                scores = np.where(valid, normalize_scores(raw, reward_stats), 0.0).astype(np.float32)
            if config.reward_clip is not None:
                scores = np.clip(scores, -config.reward_clip, config.reward_clip)

            # log-probs, values, KL-shaped rewards, GAE: rows split over the mesh. The
            # log-probs are the trainer's current policy's (decoupled PPO's proximal policy
            # when the batch was sampled by an older one).
            t1 = time.perf_counter()
            tokens, full_mask = placement.to_host(rollout.full_tokens())
            mask = (np.asarray(rollout.mask) * valid[:, None]).astype(np.float32)
            if token_scores is not None:  # the step rewards stand on their own tokens, not at the end
                scores = np.zeros_like(scores)
            rows = placement.rows({"tokens": tokens, "full_mask": full_mask, "scores": scores, "mask": mask,
                                   "token_scores": token_scores})
            with placement.context():
                old_logp, entropy, old_values, ref_logp = _evaluate(params, ref_params, rests, rows["tokens"],
                                                                    rows["full_mask"], graphs=graphs, opts=opts)
                targets = _targets_jit(
                    rows["scores"], old_logp, ref_logp, old_values, rows["mask"],
                    beta=jnp.float32(beta if config.kl_in_reward else 0.0), kl_kind=config.kl_kind,
                    gamma=config.gamma, lam=config.lam, whiten=config.whiten_advantages,
                    kl_reward_placement=config.kl_reward_placement, token_scores=rows["token_scores"])
            # whole-batch host copies: minibatches are cut from them, metrics read them
            evaluated = placement.to_host({"old_logp": old_logp, "entropy": entropy, "old_values": old_values,
                                           "ref_logp": ref_logp, **targets})

            # rollout correction: behaviour (sampler) → proximal (trainer) importance weights
            # on the policy-gradient term; rejected tokens leave the update's mask (the
            # targets above keep every valid token: rewards stay where they were earned)
            loss_mask, correction = mask, {}
            if config.records_behaviour_logprobs:
                behaviour = np.asarray(rollout.raw_logprobs)
                log_w = evaluated["old_logp"] - behaviour
                correction["rollout_mismatch_abs"] = float(ops.masked_mean(np.abs(log_w), np.asarray(rollout.mask)))
                if tis:
                    weights, kept, is_metrics = ops.rollout_correction(
                        evaluated["old_logp"], behaviour, mask, upper=config.tis_cap, lower=config.tis_lower,
                        level=config.tis_level, mode=config.tis_mode, veto=config.tis_veto)
                    loss_mask = mask * np.asarray(kept, np.float32)
                    correction = {**{k: float(v) for k, v in is_metrics.items()}, **correction,
                                  "tis_weight": np.asarray(weights, np.float32)}
            t_logprob = time.perf_counter() - t1

            # update: ppo_epochs × minibatches (+ replayed rows)
            t2 = time.perf_counter()
            current = {
                "tokens": tokens, "full_mask": full_mask, "mask": loss_mask,
                **{k: evaluated[k] for k in ("old_logp", "old_values", "advantages", "returns", "ref_logp")},
            }
            if tis:
                current["tis_weight"] = correction.pop("tis_weight")
            perm_rng = np.random.default_rng((config.run.seed, step, 20_000))
            update_batch = current
            replay_used = 0
            if config.replay_capacity:
                buffer = state["replay"]
                if config.replay_rows and int(buffer["size"]) >= config.replay_rows:
                    pick = perm_rng.choice(int(buffer["size"]), config.replay_rows, replace=False)
                    update_batch = {k: np.concatenate([current[k], np.asarray(buffer[k])[pick]]) for k in replay_keys}
                    replay_used = config.replay_rows
            batch_rows = n_rows + replay_used
            mb_size = batch_rows // config.minibatches
            opt_state, all_finite, update_metrics = state["opt_state"], True, []
            passes = config.ppo_epochs if update_batch["mask"].sum() > 0 else 0  # nothing scored: no step
            for _ in range(passes):
                order = perm_rng.permutation(batch_rows) if config.minibatches > 1 else np.arange(batch_rows)
                for mb in range(config.minibatches):
                    idx = order[mb * mb_size : (mb + 1) * mb_size]
                    mb_batch = placement.rows({**{k: v[idx] for k, v in update_batch.items()},
                                               "kl_coef": np.float32(beta)})  # rank 0: replicated
                    with placement.context():
                        params, opt_state, finite, m = _update_step(params, opt_state, mb_batch, rests,
                                                                   graphs=graphs, tx=tx, opts=opts,
                                                                   placement=placement)
                    finite, m = placement.to_host((finite, m))  # replicated scalars, read on every process
                    all_finite = all_finite and bool(finite)
                    update_metrics.append(m)
            t_update = time.perf_counter() - t2

            # KL controller (per-sequence KL of this rollout)
            seq_kl = evaluated["kl"].sum(axis=1)
            kl_mean = float(seq_kl[valid].mean()) if valid.any() else 0.0
            kl_coef_state = state["kl_coef"]
            if config.kl_schedule == "adaptive":
                kl_coef_state = np.asarray(
                    ops.adaptive_kl_coef(state["kl_coef"], kl_mean, n_rows, config.kl_target, config.kl_horizon),
                    np.float32)
            new_state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng),
                         "kl_coef": kl_coef_state, "reward_stats": reward_stats}
            if config.replay_capacity:
                new_state["replay"] = _replay_push(state["replay"], current)
            state = new_state

            # metrics (update metrics are replicated scalars)
            lengths = np.asarray(rollout.lengths)
            mean_update = ({k: float(np.mean([float(m[k]) for m in update_metrics])) for k in update_metrics[0]}
                           if update_metrics else {})
            rewards_np = evaluated["rewards"]
            metrics = {
                **mean_update,
                "reward": float(raw[valid].mean()) if valid.any() else 0.0,
                "reward_std": float(raw[valid].std()) if valid.any() else 0.0,
                "score": float(scores[valid].mean()) if valid.any() else 0.0,
                "kl": kl_mean,
                "kl_coef": beta,
                "non_score_reward": (float((rewards_np.sum(1) - np.where(valid, scores, 0.0))[valid].mean())
                                     if valid.any() else 0.0),
                "rollout_entropy": float(ops.masked_mean(evaluated["entropy"], mask)),
                "explained_variance": explained_variance(evaluated["old_values"], evaluated["returns"], mask),
                "value_mean": float(ops.masked_mean(evaluated["old_values"], mask)),
                "returns_mean": float(ops.masked_mean(evaluated["returns"], mask)),
                "response_length_mean": float(lengths.mean()),
                "response_length_max": int(lengths.max()),
                "truncated_fraction": float(np.mean(~np.asarray(rollout.finished))),
                "reward_failures": int((~valid).sum()),
                **drawn["scorer_metrics"],
                "replay_rows": replay_used,
                **drawn["episode_metrics"],
                "time_sampling": t_sample,
                "time_logprobs": t_logprob,
                "time_update": t_update,
                "time_sampler": drawn["seconds"],
                "time_step": time.perf_counter() - t0,
                "staleness": step - version,
                **correction,
            }
            loop.end_step(step, state, metrics, finite=all_finite, meta={"prompt_loader": drawn["loader_state"]})
    finally:
        pipeline.close()

    # the trained models stay on the mesh, sharded (place: a no-op unless LoRA merged them)
    trained = placement.place(policy_split.merge(full_policy(state["params"]["policy"], frozen)))
    result = loop.finish(state, model=trained, tokenizer=tokenizer)
    result.critic = (critic_split.merge(state["params"]["critic"]) if critic_split is not None
                     else state["params"]["critic"]["value_head"])
    result.kl_coef = float(state["kl_coef"]) if config.kl_schedule == "adaptive" else config.kl_coef_at(config.run.total_steps - 1)
    return result
