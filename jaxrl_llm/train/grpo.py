"""Reasoning RL with verifiable rewards: one trainer, configured by presets into GRPO,
Dr. GRPO, DAPO, GSPO and RLOO.

Per step: sample G responses for each of B prompts → score them with the reward function
(+ DAPO overlong penalty); or, with an environment (``env``), run G multi-turn episodes
per prompt (``rollout.multiturn``: tool calls, observations masked out of the loss, the
KL term and the entropy) scored by the environment's rewards → (DAPO) keep sampling until B groups carry signal → group
advantages → old / reference log-probs → μ passes of clipped policy-gradient updates.

Shapes: B prompts per step, G group size, N = B·G rows, P prompt length (bucketed),
T = max_new_tokens, L = P + T.

References:
  Shao et al. 2024, DeepSeekMath (GRPO), https://arxiv.org/abs/2402.03300
  Liu et al. 2025, Dr. GRPO, https://arxiv.org/abs/2503.20783
  Yu et al. 2025, DAPO, https://arxiv.org/abs/2503.14476
  Zheng et al. 2025, GSPO, https://arxiv.org/abs/2507.18071
  Ahmadian et al. 2024, RLOO, https://arxiv.org/abs/2402.14740
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import ops
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.prompts import PromptBatch, PromptLoader
from jaxrl_llm.data.tokenization import decode_ids, eos_id, pad_id
from jaxrl_llm.ops.policy_losses import PPO_TOKEN_MEAN_METRICS
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.rollout.multiturn import generate_episodes
from jaxrl_llm.rollout.sampler import Rollout, generate
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
    routing_change_fraction,
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

logger = logging.getLogger(__name__)

ADVANTAGES = ("group", "batch", "none", "rloo")
POLICY_LOSSES = ("ppo", "gspo")
PRESETS = ("grpo", "dr_grpo", "dapo", "gspo", "rloo")
# Below this many new tokens, DAPO's default overlong buffer (a fifth of the budget) falls
# on lengths that ordinary answers reach, so the preset warns.
SHORT_BUDGET = 256


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Configuration of the GRPO-family trainer (see ``GRPOConfig.preset``).

    Attributes:
      run, optim: loop and optimizer settings.
      prompts_per_step: B prompts sampled per step.
      group_size: G responses per prompt.
      max_prompt_len: prompts are padded to this (bucketed); longer prompts are an error.
      max_new_tokens: T, the response budget (L_max of DAPO's overlong penalty).
      temperature, top_k, top_p: sampling options.
      stop_token_ids: extra stop ids; the tokenizer's eos is always one.
      advantage: "group" (GRPO), "batch" (std over the batch), "none" (Dr. GRPO), "rloo".
      policy_loss: "ppo" (token ratio) or "gspo" (sequence ratio).
      clip_low, clip_high: ε_low, ε_high (DAPO clip-higher: 0.2, 0.28).
      dual_clip: dual-clip bound c > 1 or None.
      loss_agg: ``aggregate_loss`` mode.
      norm_length: Dr. GRPO's constant normaliser (default max_new_tokens; with an
        environment max_total_tokens).
      kl_coef: β of the KL-to-reference loss term (0: no reference model is kept).
      kl_kind: KL estimator of ``kl_penalty`` (k3 in GRPO).
      entropy_coef: entropy bonus weight.
      num_inner_updates: μ, optimizer passes over each batch (old log-probs recorded first).
      minibatches: split each pass into this many minibatches (each one update).
      dynamic_sampling: DAPO — drop groups with all-equal rewards, sample more.
      max_sampling_rounds: cap on sampling rounds per step under dynamic sampling.
      overlong_buffer: DAPO soft overlong punishment interval (0: off).
      overlong_factor: DAPO overlong penalty at max_new_tokens.
      routing_replay: MoE — replay the rollout's expert choices in training forwards.
      freeze_router: MoE — router weights get no update (experts still train).
      router_update_every: MoE two-stage updates — router trained only every k-th step.
      moe_aux_coef: weight of the MoE load-balancing loss.
      router_z_coef: MoE router regulariser — weight of the ST-MoE router z-loss.
      tis_cap: rollout correction for the sampler/trainer mismatch (None: off): the
        importance weights π_train / π_rollout of the sampled tokens are capped at C
        (``tis_mode="truncate"``, TIS), or tokens whose ratio leaves [tis_lower, C] are
        rejected from the loss (``"mask"``, MIS); ``ops.rollout_correction``.
      tis_level: "token", "sequence" (product of the ratios) or "geometric" (their
        per-token geometric mean) — the ratio the bound applies to.
      tis_mode: "truncate" or "mask".
      tis_lower: the lower rejection bound (mode "mask"; None: 1 / tis_cap).
      tis_veto: reject a whole response holding a token ratio below this (None: off).
      reward_default: score for samples the reward function failed on (an exception or
        NaN; None: the sample is excluded from the loss, as when it returns None).
      reward_funcs: reward specs used when ``train`` gets no ``reward_fn``: built-in names,
        ``file.py:function`` or ``module:function`` (``rewards.load_reward_fn``).
      reward_weights: one weight per reward function (None: 1 each); the reward is
        Σ_k w_k · r_k (TRL's ``reward_weights``).
      max_unscored_frac: stop with ``RewardHealthError`` when more than this fraction of
        a sampling round could not be scored (1.0: never stop).
      logprob_chunk_size: tokens per chunk of ``logprobs_from_hidden``.
      lora: train low-rank adapters of the policy instead of all weights (rank 0: off);
        the reference is then the frozen base model.
      max_staleness: asynchronous sampling: a sampler thread runs up to this many policy
        versions ahead of the update, overlapping sampling and reward scoring with
        training (0: synchronous). The update's clipped ratio is against the trainer's
        current policy (decoupled PPO); set ``tis_cap`` to correct for the older
        behaviour policy. Metrics ``staleness`` (versions between sampling and training)
        and ``time_sampler``. The decoupled ratio costs one extra log-prob pass per step
        (the trainer's proximal policy) that a synchronous run with one update per batch
        skips. Sampling never runs across a checkpoint, so resume stays
        exact (a signal-triggered checkpoint drops the in-flight samples; they are
        re-sampled with the restored policy).
      env: multi-turn environment factory spec, ``path/to/file.py:factory`` or
        ``package.module:factory`` (called with no arguments for each episode; see
        ``jaxrl_llm.envs``); "" (default): single-turn sampling scored by the reward
        functions. ``train(env=...)`` takes the factory itself.
      max_turns: assistant messages per episode at most (with an environment).
      max_total_tokens: response area of an episode, policy and observation tokens
        together (with an environment); None: 2 · max_turns · max_new_tokens.
        ``max_new_tokens`` is then the budget of one assistant message.
      microbatches: run each minibatch update as this many forward/backward passes whose
        gradients add up to the minibatch's exactly (``train.microbatch``, weighted by
        loss_agg): less activation memory, the same update.
      mesh: device mesh (data × fsdp × tensor). prompts_per_step (sampling) and the
        rows of one forward/backward, prompts_per_step · group_size / (minibatches ·
        microbatches), must divide by data × fsdp; group advantages are computed on the
        host over whole groups. With ``placement="disaggregated"`` it shapes the
        trainer's devices.
      placement: "colocated" (sampler and trainer share the mesh and take turns) or
        "disaggregated" (the sampler runs on a sub-mesh of its own, ``sampler_mesh``;
        after each update the weights move to it by one resharding device_put). See
        ``jaxrl_llm.train.async_sampling``.
      sampler_mesh: the sampler's mesh when disaggregated: ``num_devices`` (default half
        of the devices, taken from the end) and its data × fsdp × tensor shape;
        prompts_per_step must divide by its data × fsdp.
      reward_workers: threads per reward function scoring slices of a batch
        concurrently (for verifiers that wait on a subprocess, sandbox or server).
    """

    run: RunConfig = RunConfig(output_dir="runs/grpo")
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    prompts_per_step: int = 8
    group_size: int = 8
    max_prompt_len: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    advantage: str = "group"
    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "seq_mean_token_mean"
    norm_length: int | None = None
    kl_coef: float = 0.04
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    num_inner_updates: int = 1
    minibatches: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_buffer: int = 0
    overlong_factor: float = 1.0
    routing_replay: bool = True
    freeze_router: bool = False
    router_update_every: int = 1
    moe_aux_coef: float = 0.0
    router_z_coef: float = 0.0
    tis_cap: float | None = None
    tis_level: str = "token"
    tis_mode: str = "truncate"
    tis_lower: float | None = None
    tis_veto: float | None = None
    reward_default: float | None = None
    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    max_unscored_frac: float = 0.5
    logprob_chunk_size: int = 1024
    lora: LoRAConfig = LoRAConfig()
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
        check_positive_ints(self, ("prompts_per_step", "max_prompt_len", "max_new_tokens", "num_inner_updates",
                                   "minibatches", "max_sampling_rounds", "router_update_every",
                                   "logprob_chunk_size", "microbatches"))
        check_episode_fields(self)
        check_int_field("max_staleness", self.max_staleness, 0,
                        why="policy versions the sampler may run ahead of the update; 0: synchronous")
        check_int_field("group_size", self.group_size, 2, why="group baselines need other samples")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}")
        if self.loss_agg not in ops.AGGREGATION_MODES:
            raise ValueError(f"loss_agg must be one of {ops.AGGREGATION_MODES}, got {self.loss_agg!r}")
        if self.kl_kind not in ops.KL_KINDS:
            raise ValueError(f"kl_kind must be one of {ops.KL_KINDS}, got {self.kl_kind!r}")
        check_policy_clip(self.clip_low, self.clip_high, self.dual_clip)
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ValueError(f"dual_clip={self.dual_clip} applies to policy_loss='ppo' only; "
                             f"policy_loss={self.policy_loss!r} ignores it (set dual_clip=None)")
        for name in ("kl_coef", "entropy_coef", "moe_aux_coef", "router_z_coef"):
            check_real(name, getattr(self, name), low=0, why="a loss weight; 0 turns the term off")
        check_int_field("norm_length", self.norm_length, 1, optional=True, why="None: max_new_tokens")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(
                f"prompts_per_step * group_size = {self.prompts_per_step * self.group_size} must be "
                f"divisible by minibatches={self.minibatches}"
            )
        if (self.prompts_per_step * self.group_size // self.minibatches) % self.microbatches:
            raise ValueError(
                f"prompts_per_step * group_size / minibatches = "
                f"{self.prompts_per_step * self.group_size // self.minibatches} must be divisible by "
                f"microbatches={self.microbatches}"
            )
        check_int_field("overlong_buffer", self.overlong_buffer, 0)
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}")
        check_real("overlong_factor", self.overlong_factor, low=0,
                   why="the overlong penalty at max_new_tokens is -overlong_factor")
        check_sampling(self)
        check_real("tis_cap", self.tis_cap, low=0, low_open=True, optional=True,
                   why="the cap C of the truncated importance weights min(w, C); None turns it off")
        if self.tis_cap is not None and self.policy_loss != "ppo":
            raise ValueError(f"tis_cap={self.tis_cap} applies to policy_loss='ppo' only; "
                             f"policy_loss={self.policy_loss!r} ignores it (set tis_cap=None)")
        check_rollout_correction(self)
        check_real("reward_default", self.reward_default, optional=True,
                   why="the score of samples the reward function failed on")
        validate_reward_fields(self.reward_funcs, self.reward_weights, self.max_unscored_frac)
        if self.env and self.overlong_buffer:
            raise ValueError(f"overlong_buffer={self.overlong_buffer} penalises single responses; with env="
                             f"{self.env!r} episodes are bounded by max_total_tokens instead (set overlong_buffer=0)")

    @property
    def response_width(self) -> int:
        """T of the rollout (``train.episodes.response_width``)."""
        return response_width(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GRPOConfig":
        """Named published recipes; ``overrides`` replace any field.

        - grpo: group-std advantages, token-ratio PPO clip 0.2, seq_mean_token_mean, k3 KL β=0.04.
        - dr_grpo: no std scaling, seq_mean_token_sum_norm (constant normaliser), no KL.
        - dapo: clip-higher (0.2, 0.28), token_mean, dynamic sampling, soft overlong
          punishment (buffer = max_new_tokens / 5), no KL.
        - gspo: sequence-level ratio clipped at (3e-4, 4e-4), seq_mean_token_mean, no KL.
        - rloo: leave-one-out baseline, token_mean, no KL.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
        recipe: dict[str, Any] = {
            "grpo": dict(advantage="group", policy_loss="ppo", loss_agg="seq_mean_token_mean", kl_coef=0.04),
            "dr_grpo": dict(advantage="none", policy_loss="ppo", loss_agg="seq_mean_token_sum_norm", kl_coef=0.0),
            "dapo": dict(advantage="group", policy_loss="ppo", clip_low=0.2, clip_high=0.28,
                         loss_agg="token_mean", dynamic_sampling=True, kl_coef=0.0),
            "gspo": dict(advantage="group", policy_loss="gspo", clip_low=3e-4, clip_high=4e-4,
                         loss_agg="seq_mean_token_mean", kl_coef=0.0),
            "rloo": dict(advantage="rloo", policy_loss="ppo", loss_agg="token_mean", kl_coef=0.0),
        }[name]
        fields = {**recipe, **overrides}
        if name == "dapo" and "overlong_buffer" not in overrides:
            budget = fields.get("max_new_tokens", cls.max_new_tokens)
            fields["overlong_buffer"] = max(1, budget // 5)
            if budget < SHORT_BUDGET:
                warnings.warn(
                    f"dapo preset: overlong_buffer = max_new_tokens // 5 = {fields['overlong_buffer']} penalises "
                    f"every response longer than {budget - fields['overlong_buffer']} tokens (down to "
                    f"-overlong_factor at {budget}). DAPO sized it for a 20k-token budget; with max_new_tokens="
                    f"{budget} correct answers may need the whole budget and the policy learns to cut them "
                    "short. Set overlong_buffer=0 (off) or a buffer that fits your answers.", UserWarning,
                    stacklevel=2)
        return cls(**fields)


# ---------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class ScoredBatch:
    """Host-side results of one sampling round (N = B·G rows)."""

    rollout: Rollout
    scores: np.ndarray  # [N] float32, task reward + overlong penalty
    task_rewards: np.ndarray  # [N] float32 (NaN where unscored)
    valid: np.ndarray  # [N] bool, False where the reward could not be computed
    prompt_ids: np.ndarray  # [B] record indices


def score_rollout(
    rollout: Rollout,
    prompts: PromptBatch,
    scorer: RewardScorer,
    tokenizer: Any,
    config: GRPOConfig,
) -> ScoredBatch:
    """Decodes completions, scores them (``train.scoring``: TRL's arguments, extra record
    columns as keyword lists, one entry per completion), adds the overlong penalty."""
    tokens = np.asarray(rollout.tokens)
    lengths = np.asarray(rollout.lengths)
    completions = [
        decode_ids(tokenizer, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(len(tokens))
    ]
    task = scorer(prompts.prompts, completions, prompts.columns, config.group_size).astype(np.float32)
    valid = np.isfinite(task)
    scores = np.where(valid, task, 0.0).astype(np.float32)
    if config.overlong_buffer:
        scores = scores + np.asarray(
            ops.overlong_penalty(lengths, config.max_new_tokens, config.overlong_buffer, config.overlong_factor)
        )
    return ScoredBatch(rollout, scores, task, valid, np.asarray(prompts.indices))


def score_summary(scores: np.ndarray, task_rewards: np.ndarray, valid: np.ndarray, prefix: str = "") -> dict:
    """Mean / std of the scores and the accuracy (task reward > 0.5) over the scored rows
    only (NaN when none was scored), keyed ``{prefix}reward_mean`` etc."""
    if not valid.any():
        return {f"{prefix}reward_mean": float("nan"), f"{prefix}reward_std": float("nan"),
                f"{prefix}accuracy": float("nan")}
    return {f"{prefix}reward_mean": float(np.mean(scores[valid])), f"{prefix}reward_std": float(np.std(scores[valid])),
            f"{prefix}accuracy": float(np.mean(task_rewards[valid] > 0.5))}


def informative_groups(scores: np.ndarray, valid: np.ndarray, group_size: int) -> np.ndarray:
    """[B] bool: the group's valid scores are not all equal (it carries a learning signal)."""
    s = np.where(valid, scores, np.nan).reshape(-1, group_size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups → no signal
        spread = np.nanmax(s, axis=1) - np.nanmin(s, axis=1)
    return np.nan_to_num(spread, nan=0.0) > 0


def compute_advantages(scores: np.ndarray, valid: np.ndarray, config: GRPOConfig) -> np.ndarray:
    """[N] advantages; unscored samples take their group's mean score (so they do not move
    the baseline) and are masked out of the loss by the caller."""
    g = config.group_size
    s = np.where(valid, scores, np.nan).reshape(-1, g)
    if np.isnan(s).any():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups → mean 0
            means = np.nan_to_num(np.nanmean(s, axis=1, keepdims=True))
        s = np.where(np.isnan(s), means, s)
    flat = jnp.asarray(s.reshape(-1), jnp.float32)
    if config.advantage == "rloo":
        return np.asarray(ops.rloo_advantages(flat, g))
    return np.asarray(ops.group_advantages(flat, g, scale=config.advantage))


# ---------------------------------------------------------------------------- train step


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static (hashable) options of the jitted functions."""

    prompt_len: int
    config: GRPOConfig
    has_old: bool
    has_ref: bool
    replay: bool
    train_router: bool


def _policy_loss(params, batch, split, static: _Static):
    config = static.config
    model = split.merge(params)
    routing = batch["routing"] if static.replay else None
    out = response_logprobs(model, batch["tokens"], batch["full_mask"], static.prompt_len,
                            routing=routing, chunk_size=config.logprob_chunk_size)
    logp, entropy = out.logprobs, out.entropy
    mask = batch["mask"]
    old = batch["old_logp"] if static.has_old else jax.lax.stop_gradient(logp)
    norm_length = config.norm_length or config.response_width
    if config.policy_loss == "ppo":
        adv = batch["advantages"][:, None] * batch["tis_weight"]
        loss, metrics = ops.ppo_policy_loss(logp, old, adv, mask, config.clip_low, config.clip_high,
                                            config.dual_clip, config.loss_agg, norm_length)
    else:
        loss, metrics = ops.gspo_policy_loss(logp, old, batch["advantages"], mask, config.clip_low, config.clip_high)
    metrics = {"pg_loss": loss, **metrics}
    if static.has_ref:
        kl = ops.kl_penalty(logp, batch["ref_logp"], config.kl_kind, mask=mask)
        kl_loss = ops.aggregate_loss(kl, mask, config.loss_agg, norm_length)
        loss = loss + config.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    entropy_mean = ops.masked_mean(entropy, mask)
    if config.entropy_coef:
        loss = loss - config.entropy_coef * ops.aggregate_loss(entropy, mask, config.loss_agg, norm_length)
    if config.moe_aux_coef:
        loss = loss + config.moe_aux_coef * out.aux_loss
    if config.router_z_coef:
        loss = loss + config.router_z_coef * out.router_z_loss
    metrics.update(
        router_z_loss=out.router_z_loss,
        entropy=jax.lax.stop_gradient(entropy_mean),
        moe_aux_loss=out.aux_loss,
        routing_change=routing_change_fraction(batch["routing"], out.routing, batch["full_mask"]),
    )
    return loss, metrics


def _zero_router_grads(grads):
    """Router parameters (path ending in 'router') get zero gradient."""
    def zero(path, g):
        names = [getattr(p, "key", getattr(p, "name", p)) for p in path]
        return jnp.zeros_like(g) if "router" in [str(n) for n in names] else g

    return jax.tree_util.tree_map_with_path(zero, grads)


def _make_update(split, tx, static: _Static, placement: Placement):
    config = static.config
    lora = config.lora
    # GSPO's loss (and its ratio_mean) is a mean over sequences; the PPO loss follows loss_agg
    agg = config.loss_agg if config.policy_loss == "ppo" else "seq_mean_token_mean"
    token_means = PPO_TOKEN_MEAN_METRICS + ("entropy",)
    if config.policy_loss == "gspo":
        token_means = tuple(name for name in token_means if name != "ratio_mean")

    def update(params, opt_state, batch, train_router, frozen=None):
        def loss_fn(p, b):
            full = apply_lora(frozen, p, lora) if lora.enabled else p
            if b["routing"] is not None:  # rows back on axis 1: [M, rows, L, k]
                b = {**b, "routing": jnp.moveaxis(b["routing"], 0, 1)}
            return _policy_loss(full, b, split, static)

        # micro-batches split rows on axis 0: MoE routing [M, N, L, k] moves its rows first
        rows_first = batch if batch["routing"] is None else {**batch, "routing": jnp.moveaxis(batch["routing"], 1, 0)}
        tokens = row_weights(batch["mask"], "token_mean")
        (loss, metrics), grads = accumulated_value_and_grad(loss_fn, params, rows_first, row_weights(batch["mask"], agg),
                                                            config.microbatches, dict.fromkeys(token_means, tokens))
        grads = jax.lax.cond(train_router, lambda g: g, _zero_router_grads, grads)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        params, opt_state, finite = apply_if_finite(tx, params, opt_state, grads, loss)
        params, opt_state = placement.constrain((params, opt_state))
        return params, opt_state, finite, {"loss": loss, **metrics}

    return jax.jit(update)


def _make_logprob_fn(split, static: _Static):
    def logprobs(params, tokens, full_mask, routing):
        model = split.merge(params)
        out = response_logprobs(model, tokens, full_mask, static.prompt_len,
                                routing=routing if static.replay else None,
                                chunk_size=static.config.logprob_chunk_size)
        return out.logprobs, out.routing

    return jax.jit(logprobs)


# ---------------------------------------------------------------------------- train


def _sample_round(model, loader, config, rng, pad, stop_ids, placement: Placement) -> tuple[PromptBatch, Rollout]:
    """One round of sampling on the mesh; the rollout comes back whole, as host arrays."""
    prompts = next(loader)
    with placement.context():
        rollout = generate(
            model, prompts.tokens, prompts.mask, max_new_tokens=config.max_new_tokens, num_samples=config.group_size,
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, stop_token_ids=stop_ids,
            pad_token_id=pad, rng=rng, return_raw_logprobs=config.tis_cap is not None, prompt_bucket=0,
            mesh=placement.mesh,
        )
    return prompts, placement.to_host(rollout)


def _sample_episodes(model, loader, records, env_factory, tokenizer, config, rng, seed, pad, stop_ids,
                     placement: Placement) -> tuple[ScoredBatch, dict]:
    """One round of multi-turn episodes (G per prompt), scored by the environment's
    rewards; returns the batch and the episodes' summary metrics."""
    prompts = next(loader)
    with placement.context():
        episodes = generate_episodes(
            model, tokenizer, [records[i] for i in prompts.indices], env_factory, max_turns=config.max_turns,
            max_new_tokens=config.max_new_tokens, max_total_tokens=config.response_width,
            num_samples=config.group_size, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            stop_token_ids=stop_ids, pad_token_id=pad, rng=rng, seed=seed, prompt_width=config.max_prompt_len)
    rewards = episodes.rewards.astype(np.float32)
    batch = ScoredBatch(episodes.rollout, rewards, rewards.copy(), np.ones(len(rewards), bool),
                        np.asarray(prompts.indices))
    return batch, episodes.summary()


def _mean_over_rounds(summaries: list[dict]) -> dict:
    """Each episode metric averaged over the sampling rounds that report it (an
    environment's info keys appear only in rounds where it was stepped)."""
    keys = dict.fromkeys(k for m in summaries for k in m)
    return {k: float(np.mean([m[k] for m in summaries if k in m])) for k in keys}


def _concat(batches: list[ScoredBatch], group_size: int, want_groups: int) -> tuple[ScoredBatch, np.ndarray]:
    """Keeps informative groups across rounds (first `want_groups`); pads with fully masked
    groups so the batch shape (and the compiled update) never changes."""
    sources = []
    for bi, b in enumerate(batches):
        for gi in np.where(informative_groups(b.scores, b.valid, group_size))[0]:
            sources.append((bi, gi))
    sources = sources[:want_groups]
    filled = len(sources)
    while len(sources) < want_groups:  # padding: repeat the first group of round 0, masked
        sources.append((0, -1))
    def take(arr_fn):
        rows = []
        for bi, gi in sources:
            arr = arr_fn(batches[bi])
            g = max(gi, 0)
            rows.append(arr[g * group_size : (g + 1) * group_size])
        return np.concatenate(rows, axis=0)
    live = np.concatenate([np.full(group_size, gi >= 0) for _, gi in sources])
    r0 = batches[0].rollout
    fields = {}
    for f in dataclasses.fields(r0):
        v = getattr(r0, f.name)
        if v is None:
            fields[f.name] = None
        elif f.name == "routing":
            fields[f.name] = np.concatenate(
                [getattr(batches[bi].rollout, f.name)[:, max(gi, 0) * group_size : (max(gi, 0) + 1) * group_size]
                 for bi, gi in sources], axis=1)
        else:
            fields[f.name] = take(lambda b, n=f.name: np.asarray(getattr(b.rollout, n)))
    rollout = Rollout(**fields)
    valid = take(lambda b: b.valid) & live
    merged = ScoredBatch(
        rollout, take(lambda b: b.scores), take(lambda b: b.task_rewards), valid,
        np.array([batches[bi].prompt_ids[max(gi, 0)] for bi, gi in sources]),
    )
    return merged, np.array(filled)


def train(
    config: GRPOConfig,
    *,
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[dict],
    reward_fn: Callable | Sequence[Callable | str] | None = None,
    reference: Any = None,
    env: Callable[[], Any] | None = None,
) -> TrainResult:
    """Trains ``policy`` with the GRPO family on prompts scored by ``reward_fn``.

    Args:
      config: a GRPOConfig (e.g. ``GRPOConfig.preset("dapo", ...)``).
      policy: a CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or ``CharTokenizer``.
      prompts: records with a ``prompt`` (string or chat messages) and extra columns
        (e.g. ``answer``) passed to the reward function as keyword lists.
      reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float | None]``, or
        a list of functions / specs weighted by ``config.reward_weights``; None: the
        config's ``reward_funcs``.
      reference: frozen reference model (default: the initial policy) — only used when
        kl_coef > 0.
      env: a multi-turn environment factory (``jaxrl_llm.envs``), called with no
        arguments per episode; None: ``config.env`` (a spec), or single-turn sampling
        when that is empty. With an environment its rewards are the scores and
        ``reward_fn`` must be None.

    Returns:
      TrainResult with the trained model and per-step metrics.
    """
    check_formats(prompts, "prompt")
    env_factory = resolve_env(env, config, has_reward=reward_fn is not None or bool(config.reward_funcs))
    scorer = None if env_factory is not None else RewardScorer(
        resolve_reward(reward_fn, config), default=config.reward_default, max_unscored_frac=config.max_unscored_frac,
        workers=config.reward_workers)
    n_rows = config.prompts_per_step * config.group_size
    update_rows = ("prompts_per_step * group_size / minibatches" if config.microbatches == 1
                   else "prompts_per_step * group_size / (minibatches * microbatches)")
    check_tokenizer_fits(policy, tokenizer)
    check_tokenizer_fits(reference, tokenizer)
    roles = make_role_placements(config, policy, {update_rows: n_rows // (config.minibatches * config.microbatches)},
                                 {"prompts_per_step": config.prompts_per_step})
    placement, sampler_placement = roles.trainer, roles.sampler
    model = placed_model(policy, placement)
    pad = pad_id(tokenizer)
    stop_ids = tuple(dict.fromkeys((eos_id(tokenizer), *config.stop_token_ids)))
    # Fixed prompt width (bucket="max"): every sampling round has the same shapes, so the
    # rounds of dynamic sampling concatenate and nothing recompiles.
    loader = PromptLoader(prompts, tokenizer, config.prompts_per_step, seed=config.run.seed,
                          max_prompt_len=config.max_prompt_len, padding_side="right", bucket="max")
    split = split_model(model)
    updates_per_step = config.num_inner_updates * config.minibatches
    tx = make_optimizer(config.optim, config.run.total_steps * updates_per_step)
    has_ref = config.kl_coef > 0
    ref_params = None
    if has_ref:
        ref_params = split_model(placed_model(reference, placement)).params if reference is not None else split.params
    is_moe = getattr(model.config, "num_moe_layers", 0) > 0
    prompt_len = config.max_prompt_len
    # Asynchronous sampling: the clipped ratio is taken against the trainer's own policy
    # (decoupled PPO's proximal policy), recomputed every step; the sampler's log-probs
    # (the behaviour policy) enter only through the rollout correction (tis_cap).
    has_old = updates_per_step > 1 or config.max_staleness > 0
    static = _Static(prompt_len, config, has_old, has_ref, replay=is_moe and config.routing_replay, train_router=True)
    update_fn = _make_update(split, tx, static, placement)
    logprob_fn = _make_logprob_fn(split, static)
    ref_logprob_fn = _make_logprob_fn(split, dataclasses.replace(static, replay=False)) if has_ref else None

    # LoRA: the adapters train, the base weights stay frozen (and serve as the reference).
    frozen = split.params if config.lora.enabled else None
    trainable = init_lora(split.params, config.lora, jax.random.PRNGKey(config.run.seed + 1)) if frozen else split.params
    full_params = jax.jit(lambda a, base: apply_lora(base, a, config.lora)) if frozen else (lambda a, base: a)
    state = placement.place({
        "params": trainable,
        "opt_state": tx.init(trainable),
        "rng": jax.random.key_data(jax.random.PRNGKey(config.run.seed)),
    })
    loop = TrainLoop(config, config.run, desc="grpo")
    state, start = loop.start(state)
    if "prompt_loader" in loop.meta:
        loader.load_state_dict(loop.meta["prompt_loader"])

    def sample_step(step: int, k_step, current) -> dict:
        """Sampling and scoring of one step (DAPO: until B informative groups or the
        round cap) with the policy ``current``; runs in the sampler thread when
        max_staleness > 0, so everything it reads or counts is returned, not shared."""
        t_start = time.perf_counter()
        rounds: list[ScoredBatch] = []
        episode_metrics: list[dict] = []
        informative_before = None
        for round_ in range(config.max_sampling_rounds if config.dynamic_sampling else 1):
            if env_factory is not None:  # environment seed: replayed exactly on resume
                scored, summary = _sample_episodes(current, loader, prompts, env_factory, tokenizer, config,
                                                   jax.random.fold_in(k_step, round_),
                                                   config.run.seed * 1_000_003 + step * 1_009 + round_, pad,
                                                   stop_ids, sampler_placement)
                rounds.append(scored)
                episode_metrics.append(summary)
            else:
                prompt_batch, rollout = _sample_round(current, loader, config, jax.random.fold_in(k_step, round_),
                                                      pad, stop_ids, sampler_placement)
                rounds.append(score_rollout(rollout, prompt_batch, scorer, tokenizer, config))
            if informative_before is None:
                informative_before = float(np.mean(informative_groups(rounds[0].scores, rounds[0].valid, config.group_size)))
            if not config.dynamic_sampling:
                break
            have = sum(int(informative_groups(b.scores, b.valid, config.group_size).sum()) for b in rounds)
            if have >= config.prompts_per_step:
                break
        return {"rounds": rounds, "episode_metrics": episode_metrics, "informative_before": informative_before,
                "scorer_metrics": scorer.step_metrics() if scorer is not None else {},
                "loader_state": loader.state_dict(), "seconds": time.perf_counter() - t_start}

    # the sampler's policy: the trainer's weights moved to the sampler's mesh (a resharding
    # device_put when disaggregated; the same arrays when colocated)
    pipeline = SamplePipeline(sample_step, config, roles, split, start=start, rng=state["rng"], name="grpo-sampler")

    try:
        for step in range(start, config.run.total_steps):
            t0 = time.perf_counter()
            policy_params = full_params(state["params"], frozen)
            drawn, version, rng = pipeline.get(step, lambda: policy_params)
            rounds, episode_metrics = drawn["rounds"], drawn["episode_metrics"]
            informative_before = drawn["informative_before"]
            t_sample = time.perf_counter() - t0
            if config.dynamic_sampling:
                batch, filled = _concat(rounds, config.group_size, config.prompts_per_step)
                if filled < config.prompts_per_step:
                    logger.warning(
                        "dynamic sampling: only %d of %d groups carried signal after %d rounds (cap "
                        "max_sampling_rounds=%d); training on those", int(filled), config.prompts_per_step,
                        len(rounds), config.max_sampling_rounds)
            else:
                batch, filled = rounds[0], np.array(config.prompts_per_step)

            # advantages
            advantages = compute_advantages(batch.scores, batch.valid, config)
            rollout = batch.rollout
            tokens, full_mask = placement.to_host(rollout.full_tokens())
            mask = (np.asarray(rollout.mask) * batch.valid[:, None]).astype(np.float32)
            routing = placement.to_host(rollout.full_routing())  # aligned with full_tokens' left-aligned prompts
            if has_old or config.tis_cap is not None or has_ref:
                # device copies for the log-prob passes, rows split over the mesh (routing: axis 1)
                tokens_d, full_mask_d = placement.rows((tokens, full_mask))
                routing_d = placement.rows(routing, axis=1)

            # old / reference log-probs
            t1 = time.perf_counter()
            tis_weight = np.ones_like(mask)
            metrics_extra = {}
            old_logp = None
            if has_old or config.tis_cap is not None:
                with placement.context():
                    old_logp = placement.to_host(logprob_fn(policy_params, tokens_d, full_mask_d, routing_d)[0])
            if config.tis_cap is not None:
                log_w = old_logp - np.asarray(rollout.raw_logprobs)
                weights, kept, is_metrics = ops.rollout_correction(
                    old_logp, np.asarray(rollout.raw_logprobs), mask, upper=config.tis_cap, lower=config.tis_lower,
                    level=config.tis_level, mode=config.tis_mode, veto=config.tis_veto)
                tis_weight = np.asarray(weights, np.float32)
                mask = mask * np.asarray(kept, np.float32)  # rejected tokens leave the loss and its normaliser
                metrics_extra.update({k: float(v) for k, v in is_metrics.items()})
                metrics_extra["rollout_mismatch_abs"] = float(ops.masked_mean(np.abs(log_w), np.asarray(rollout.mask)))
            ref_logp = None
            if has_ref:
                with placement.context():
                    ref_logp = placement.to_host(ref_logprob_fn(ref_params, tokens_d, full_mask_d, None)[0])
            t_logprob = time.perf_counter() - t1

            # update: μ passes × minibatches
            t2 = time.perf_counter()
            train_router = not config.freeze_router and (step % config.router_update_every == 0)
            # host arrays: each minibatch below is cut on the host and split over the mesh
            full_batch = {
                "tokens": tokens, "full_mask": full_mask, "mask": mask,
                "advantages": np.asarray(advantages, np.float32), "tis_weight": tis_weight,
                "old_logp": old_logp if old_logp is not None else np.zeros_like(mask),
                "ref_logp": ref_logp if ref_logp is not None else np.zeros_like(mask),
                "routing": routing,
            }
            mb_size = n_rows // config.minibatches
            all_finite, update_metrics = True, []
            params, opt_state = state["params"], state["opt_state"]
            perm_rng = np.random.default_rng((config.run.seed, step, 10_000))
            # A batch with no signal (every group degenerate, every sample unscored) is not
            # stepped at all: Adam's momentum would otherwise still move the parameters.
            inner_passes = config.num_inner_updates if mask.sum() > 0 else 0
            for _ in range(inner_passes):
                order = perm_rng.permutation(n_rows) if config.minibatches > 1 else np.arange(n_rows)
                for mb in range(config.minibatches):
                    idx = order[mb * mb_size : (mb + 1) * mb_size]
                    mb_batch = {k: (None if v is None else (v[:, idx] if k == "routing" else v[idx])) for k, v in full_batch.items()}
                    mb_routing = placement.rows(mb_batch.pop("routing"), axis=1)
                    mb_batch = {**placement.rows(mb_batch), "routing": mb_routing}
                    with placement.context():
                        params, opt_state, finite, m = update_fn(params, opt_state, mb_batch, train_router, frozen)
                    finite, m = placement.to_host((finite, m))
                    all_finite = all_finite and bool(finite)
                    update_metrics.append(m)
            state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng)}
            t_update = time.perf_counter() - t2

            # metrics
            lengths = np.asarray(rollout.lengths)
            # Headline reward / accuracy: every sampled response of every round. Under dynamic
            # sampling the trained batch keeps only informative groups (all-correct groups are
            # dropped), so its figures are logged apart, as kept_*.
            sampled = score_summary(*(np.concatenate([getattr(b, f) for b in rounds])
                                      for f in ("scores", "task_rewards", "valid")))
            kept = score_summary(batch.scores, batch.task_rewards, batch.valid, "kept_") if config.dynamic_sampling else {}
            mean_update = {k: float(np.mean([float(m[k]) for m in update_metrics])) for k in update_metrics[0]} if update_metrics else {}
            num_tokens = float(mask.sum())
            elapsed = time.perf_counter() - t0
            metrics = {
                **mean_update,
                **sampled,
                **kept,
                "informative_groups_before": informative_before,
                "informative_groups_after": float(np.mean(informative_groups(batch.scores, batch.valid, config.group_size))),
                "sampling_rounds": len(rounds),
                "skipped_no_signal": int(inner_passes == 0),
                "generations": len(rounds) * n_rows,
                "reward_failures": int(sum((~b.valid).sum() for b in rounds)),
                **drawn["scorer_metrics"],
                **_mean_over_rounds(episode_metrics),
                "response_length_mean": float(lengths.mean()),
                "response_length_max": int(lengths.max()),
                "truncated_fraction": float(np.mean(~np.asarray(rollout.finished))),
                **({"overlong_penalized_fraction": float(np.mean(lengths > config.max_new_tokens - config.overlong_buffer))}
                   if config.overlong_buffer else {}),
                "time_sampling": t_sample,
                "time_sampler": drawn["seconds"],
                "staleness": step - version,
                "time_logprobs": t_logprob,
                "time_update": t_update,
                "tokens_per_s": num_tokens / max(elapsed, 1e-9),
                "time_step": elapsed,
                **metrics_extra,
            }
            if has_ref:
                metrics["kl"] = mean_update.get("kl_loss", 0.0)
            loop.end_step(step, state, metrics, finite=all_finite, meta={"prompt_loader": drawn["loader_state"]})
    finally:
        pipeline.close()

    return loop.finish(state, model=split.merge(full_params(state["params"], frozen)), tokenizer=tokenizer)
