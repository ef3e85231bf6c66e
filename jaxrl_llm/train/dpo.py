"""Offline preference optimisation: DPO and its variants (cDPO, robust DPO, IPO, hinge /
SLiC), with length normalisation (SimPO-style), an RPO-style NLL term on the chosen
response, reference-free training, and a precomputed (cached) reference; the
reference-free SimPO and ORPO; and KTO on unpaired desirable / undesirable completions.

Per step: a batch of B (prompt, chosen, rejected) pairs → ONE forward of the policy over
the concatenated ``[2B, L]`` rows (chosen rows first) → response-token log-probs via the
chunked ``ops.logprobs_from_hidden`` (prompt and padding masked) → sequence log-probs →
``ops.dpo_loss`` against the frozen reference's sequence log-probs (computed the same
way inside the jitted step, or looked up in a cache built once over the dataset).

KTO (``loss_kind="kto"``) reads unpaired records ``{prompt, completion, label: bool}``;
its ``[2B, L]`` rows are the B completions then B mismatched rows (prompt i with
completion i − 1 of the batch) whose policy − reference log-ratio gives the KL reference
point z0 (``ops.kto_reference_point``).

Shapes: B pairs per step, L tokens per row (prompt + response, right-padded), T = L − 1
predicted positions.

References:
  Rafailov et al. 2023, DPO, https://arxiv.org/abs/2305.18290
  Azar et al. 2023, IPO, https://arxiv.org/abs/2310.12036
  Meng et al. 2024, SimPO (length-normalised, reference-free), https://arxiv.org/abs/2405.14734
  Pang et al. 2024, Iterative RPO (NLL term on chosen), https://arxiv.org/abs/2404.19733
  Hong et al. 2024, ORPO, https://arxiv.org/abs/2403.07691
  Ethayarajh et al. 2024, KTO, https://arxiv.org/abs/2402.01306
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.padding import check_bucket
from jaxrl_llm.data.preferences import (
    OVERLONG_PREFERENCE_POLICIES,
    PreferenceBatch,
    PreferenceLoader,
    UnpairedBatch,
    UnpairedLoader,
    collate_pairs,
    is_kwise,
    preference_label,
)
from jaxrl_llm.data.records import load_records
from jaxrl_llm.data.tokenization import pad_id
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.train.guard import apply_if_finite
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, init_lora
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.train.policy import SplitModel, check_tokenizer_fits, make_placement, placed_model, split_model
from jaxrl_llm.train.validation import check_int_field, check_positive_ints, check_real

logger = logging.getLogger(__name__)

REFERENCE_CACHE = "reference_logprobs.npz"
# ops.DPO_KINDS plus the losses with their own op: SimPO and ORPO (reference-free) and KTO.
REFERENCE_FREE_KINDS = ("simpo", "orpo")
LOSS_KINDS = ops.DPO_KINDS + REFERENCE_FREE_KINDS + ("kto",)
DATA_STATS = "data_stats.json"


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Configuration of the DPO-family trainer.

    Attributes:
      run, optim: loop and optimizer settings.
      beta: β, the strength of the implicit KL constraint (> 0); SimPO's reward scale β;
        ORPO's weight λ of the odds-ratio term (TRL's ``beta`` in each case).
      loss_kind: one of ``LOSS_KINDS``: "sigmoid" (DPO; cDPO with label_smoothing > 0),
        "robust" (provably robust DPO), "ipo", "hinge" (SLiC); "simpo" (``ops.simpo_loss``,
        reference-free, length-normalised), "orpo" (``ops.orpo_loss``: NLL of the chosen
        response + β·odds-ratio term, reference-free, length-normalised), "kto"
        (``ops.kto_loss`` on unpaired records ``{prompt, completion, label: bool}``).
        SimPO and ORPO load and keep no reference model.
      label_smoothing: ε, the assumed fraction of flipped labels (sigmoid / robust / simpo).
      simpo_gamma: SimPO's target reward margin γ ≥ 0 (TRL's ``simpo_gamma``).
      kto_desirable_weight, kto_undesirable_weight: KTO's λ_D, λ_U > 0 (TRL's
        ``desirable_weight`` / ``undesirable_weight``).
      length_normalize: sequence log-probs are divided by the response length (SimPO /
        ORPO style) for policy and reference alike (DPO kinds; "simpo" and "orpo" always
        normalise; not with "kto").
      sft_weight: α of an RPO-style term α·NLL(chosen) (token mean over chosen responses;
        with "simpo" it is CPO's ``cpo_alpha``; not with "orpo", whose loss holds the NLL,
        nor "kto").
      reference_free: the reference log-probs are 0 (no reference model; with
        length_normalize this is SimPO without its margin).
      precompute_reference: compute the reference's sequence log-probs once over the
        dataset before training and cache them (also in output_dir), so the reference
        model is not kept in memory during training.
      batch_size: B pairs per step (KTO: B unpaired completions, at least 2).
      max_len: longest prompt + response row; longer responses are truncated (counted).
      bucket: row-length rounding of the loader ("max": always max_len, compiles once).
      overlong: "truncate" | "error" | "drop" for rows longer than max_len.
      add_bos: prepend the tokenizer's bos to every prompt.
      moe_aux_coef: weight of the MoE load-balancing loss (MoE policies).
      logprob_chunk_size: tokens per chunk of ``logprobs_from_hidden``.
      lora: train low-rank adapters instead of all weights (rank 0: off); the default
        reference is then the frozen base model.
      mesh: device mesh (data × fsdp × tensor) of the policy, the reference and the
        reference pass; batch_size must divide by data × fsdp.
    """

    run: RunConfig = RunConfig(output_dir="runs/dpo")
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    beta: float = 0.1
    loss_kind: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    length_normalize: bool = False
    sft_weight: float = 0.0
    reference_free: bool = False
    precompute_reference: bool = False
    batch_size: int = 8
    max_len: int = 512
    bucket: int | str = "max"
    overlong: str = "truncate"
    add_bos: bool = False
    moe_aux_coef: float = 0.0
    logprob_chunk_size: int = 1024
    lora: LoRAConfig = LoRAConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("batch_size", "logprob_chunk_size"))
        check_int_field("max_len", self.max_len, 2, why="a prompt and a response token")
        if self.loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {LOSS_KINDS}, got {self.loss_kind!r}")
        check_real("beta", self.beta, low=0, low_open=True, why="β, the strength of the implicit KL constraint")
        check_real("label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True,
                   why="the assumed fraction of flipped labels; at 0.5 the preference carries no signal")
        if self.label_smoothing and self.loss_kind not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"label_smoothing applies to loss_kind 'sigmoid', 'robust' or 'simpo', "
                             f"not {self.loss_kind!r}")
        check_real("simpo_gamma", self.simpo_gamma, low=0, why="SimPO's target reward margin γ")
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            check_real(name, getattr(self, name), low=0, low_open=True, why="a KTO loss weight (λ_D, λ_U)")
        self._check_kind_options()
        for name in ("sft_weight", "moe_aux_coef"):
            check_real(name, getattr(self, name), low=0, why="a loss weight; 0 turns the term off")
        if self.reference_free and self.precompute_reference:
            raise ValueError("reference_free and precompute_reference exclude each other (no reference to cache)")
        if self.overlong not in OVERLONG_PREFERENCE_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_PREFERENCE_POLICIES}, got {self.overlong!r}")
        check_bucket(self.bucket)

    def _check_kind_options(self) -> None:
        """Options that do not apply to the chosen loss_kind are errors, not ignored."""
        kind = self.loss_kind
        if kind in REFERENCE_FREE_KINDS and self.precompute_reference:
            raise ValueError(f"precompute_reference must be False with loss_kind={kind!r} (reference-free: "
                             "no reference model is used)")
        if kind == "orpo" and self.sft_weight:
            raise ValueError("sft_weight must be 0 with loss_kind='orpo': ORPO's loss already holds the NLL of "
                             "the chosen response (weight 1); beta weighs the odds-ratio term")
        if kind == "kto":
            for name in ("sft_weight", "reference_free", "precompute_reference", "length_normalize"):
                if getattr(self, name):
                    raise ValueError(f"{name} must be {'0' if name == 'sft_weight' else 'False'} with "
                                     f"loss_kind='kto' (KTO needs the reference on summed log-probs, and its "
                                     "KL rows depend on the batch, so they cannot be cached)")
            if self.batch_size < 2:
                raise ValueError(f"batch_size must be >= 2 with loss_kind='kto' (the KL reference point pairs "
                                 f"each prompt with another record's completion), got {self.batch_size}")


def uses_reference(config: DPOConfig) -> bool:
    """True when the loss needs the reference model's log-probs."""
    return not config.reference_free and config.loss_kind not in REFERENCE_FREE_KINDS


# ---------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class PreferenceDataStats:
    """What happened to the preference records before training.

    Attributes:
      records: records given (k-wise records count once).
      pairs: pairs after k-wise expansion (ties between k-wise responses dropped).
      ties_dropped: pairwise records with label 0.5 (no preference), dropped.
      swapped: pairwise records with label < 0.5 (rejected preferred), swapped.
      overlong_truncated: pairs whose responses were cut at max_len (kept).
      overlong_dropped: pairs dropped as too long (overlong="drop", or no room for a
        response token after the prompt).
      identical_dropped: pairs whose chosen and rejected token ids are identical (after
        truncation): no preference signal, dropped.
      kept: pairs trained on.
    """

    records: int
    pairs: int
    ties_dropped: int
    swapped: int
    overlong_truncated: int
    overlong_dropped: int
    identical_dropped: int
    kept: int


def _orient_pairs(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict], int, int]:
    """Drops pairwise ties (label 0.5) and swaps pairs whose label says rejected is
    preferred (label < 0.5); k-wise records pass unchanged. Returns (records, ties, swapped)."""
    out, ties, swapped = [], 0, 0
    for index, rec in enumerate(records):
        if is_kwise(rec) or rec.get("label") is None:
            out.append(dict(rec))
            continue
        label = preference_label(rec, index)
        if label == 0.5:
            ties += 1
            continue
        if label < 0.5:
            rec = {**rec, "chosen": rec.get("rejected"), "rejected": rec.get("chosen"), "label": 1.0 - label}
            swapped += 1
        out.append(dict(rec))
    return out, ties, swapped


class _IndexedLoader:
    """A PreferenceLoader whose batches also carry each pair's index in ``loader.records``
    (to look up cached reference log-probs)."""

    def __init__(self, loader: PreferenceLoader):
        self.loader = loader
        collate = loader.collate
        loader.collate = lambda rows, longest: (collate(rows, longest), np.asarray([ex.index for ex in rows]))

    def __next__(self) -> tuple[PreferenceBatch, np.ndarray]:
        return next(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def make_preference_loader(
    config: DPOConfig, tokenizer: Any, preferences: Any, *, shuffle: bool = True
) -> tuple[PreferenceLoader, PreferenceDataStats]:
    """Loads, orients, tokenizes and filters preference records into a PreferenceLoader.

    Pairwise ties (label 0.5) and pairs whose chosen and rejected responses tokenize to the
    same ids (after truncation) are dropped and counted (a warning names the count); pairs
    with label < 0.5 are swapped; k-wise records are expanded into all pairs (ties dropped).

    Args:
      config: DPOConfig (batch_size, max_len, bucket, overlong, add_bos, run.seed).
      tokenizer: HF tokenizer or CharTokenizer.
      preferences: records (list of dicts, ``datasets`` object) or a local path
        (.jsonl / .json / .parquet / ``save_to_disk`` directory).
      shuffle: shuffle every epoch.

    Returns:
      (PreferenceLoader, PreferenceDataStats).
    """
    records = load_records(preferences, required=())
    check_formats(records, "preference")
    oriented, ties, swapped = _orient_pairs(records)
    if not oriented:
        raise ValueError(f"no preference pairs left: all {len(records)} records are ties (label 0.5)")

    def build(recs):
        return PreferenceLoader(recs, tokenizer, config.batch_size, max_len=config.max_len, kind="pairwise",
                                seed=config.run.seed, shuffle=shuffle, drop_last=shuffle, overlong=config.overlong,
                                ties="drop", bucket=config.bucket, add_bos=config.add_bos)

    loader = build(oriented)
    pairs, stats = len(loader.records), loader.stats
    identical = {ex.index for ex in loader.items if ex.response_ids[0] == ex.response_ids[1]}
    if identical:
        logger.warning("dropping %d preference pair(s) whose chosen and rejected responses are identical "
                       "(after tokenization/truncation), e.g. record %d", len(identical), min(identical))
        kept = [r for i, r in enumerate(loader.records) if i not in identical]
        if not kept:
            raise ValueError("every preference pair has chosen == rejected; nothing to learn from")
        loader = build(kept)
    if ties:
        logger.warning("dropped %d tied preference record(s) (label 0.5)", ties)
    if stats.truncated or stats.dropped:
        logger.warning("preference pairs over max_len=%d: %d truncated, %d dropped",
                       config.max_len, stats.truncated, stats.dropped)
    data_stats = PreferenceDataStats(
        records=len(records), pairs=pairs, ties_dropped=ties, swapped=swapped,
        overlong_truncated=stats.truncated, overlong_dropped=stats.dropped,
        identical_dropped=len(identical), kept=len(loader.items))
    return loader, data_stats


@dataclasses.dataclass(frozen=True)
class UnpairedDataStats:
    """What happened to the unpaired (KTO) records before training.

    Attributes:
      records: records given.
      desirable, undesirable: records kept with label True / False.
      overlong_truncated: records whose completion was cut at max_len (kept).
      overlong_dropped: records dropped as too long.
      kept: records trained on.
    """

    records: int
    desirable: int
    undesirable: int
    overlong_truncated: int
    overlong_dropped: int
    kept: int


def make_unpaired_loader(
    config: DPOConfig, tokenizer: Any, records: Any, *, shuffle: bool = True
) -> tuple[UnpairedLoader, UnpairedDataStats]:
    """Loads and tokenizes unpaired records ``{prompt, completion, label: bool}`` (KTO).

    Args:
      config: DPOConfig (batch_size, max_len, bucket, overlong, add_bos, run.seed).
      tokenizer: HF tokenizer or CharTokenizer.
      records: a list of dicts, ``datasets`` object or local path (as ``load_records``).
      shuffle: shuffle every epoch.

    Returns:
      (UnpairedLoader, UnpairedDataStats). A warning names the desirable / undesirable
      counts when one kind is missing (KTO then learns from one side only).
    """
    records = load_records(records, required=())
    loader = UnpairedLoader(records, tokenizer, config.batch_size, max_len=config.max_len, seed=config.run.seed,
                            shuffle=shuffle, drop_last=shuffle, overlong=config.overlong, bucket=config.bucket,
                            add_bos=config.add_bos)
    desirable = sum(ex.label > 0 for ex in loader.items)
    undesirable = len(loader.items) - desirable
    if not desirable or not undesirable:
        logger.warning("unpaired (KTO) records: %d desirable, %d undesirable; one side is empty",
                       desirable, undesirable)
    stats = loader.stats
    if stats.truncated or stats.dropped:
        logger.warning("unpaired records over max_len=%d: %d truncated, %d dropped",
                       config.max_len, stats.truncated, stats.dropped)
    return loader, UnpairedDataStats(records=len(records), desirable=desirable, undesirable=undesirable,
                                     overlong_truncated=stats.truncated, overlong_dropped=stats.dropped,
                                     kept=len(loader.items))


def batch_arrays(batch: PreferenceBatch | UnpairedBatch) -> dict[str, np.ndarray]:
    """The concatenated ``[2B, L]`` host arrays of a batch: tokens, attention_mask, mask
    (1.0 on response tokens), chosen rows first (an ``UnpairedBatch``: completions first,
    then the mismatched KL rows, plus ``labels`` [B]). Host arrays, so ``Placement.rows``
    transfers each process only its own rows."""
    if isinstance(batch, UnpairedBatch):
        return {"tokens": np.asarray(batch.tokens, np.int32),
                "attention_mask": np.asarray(batch.attention_mask, np.int32),
                "mask": np.asarray(batch.mask, np.float32), "labels": np.asarray(batch.labels, np.float32)}
    tokens, mask, attention = batch.concatenated()
    return {"tokens": np.asarray(tokens, np.int32), "attention_mask": np.asarray(attention, np.int32),
            "mask": np.asarray(mask, np.float32)}


def _num_tokens(batch: PreferenceBatch | UnpairedBatch) -> float:
    if isinstance(batch, UnpairedBatch):
        return float(np.asarray(batch.attention_mask).sum())
    return float(np.asarray(batch.chosen_attention_mask).sum() + np.asarray(batch.rejected_attention_mask).sum())


# ---------------------------------------------------------------------------- loss


def sequence_logprobs(model: nnx.Module, batch: Mapping[str, jax.Array], chunk_size: int = 1024):
    """Summed response log-probs of every row, from one teacher-forced forward.

    The hidden state at column t predicts token t + 1, so the targets are
    ``tokens[:, 1:]`` weighted by ``mask[:, 1:]`` (prompt and padding masked). The
    float32 ``[2B, L, V]`` logits are never materialised.

    Args:
      model: CausalLM.
      batch: tokens, attention_mask, mask — all ``[N, L]`` (N = 2B, chosen rows first).
      chunk_size: tokens per chunk of ``logprobs_from_hidden``.

    Returns:
      (sums [N] float32 Σ_t log π(y_t), lengths [N] float32 response tokens,
       token_logp [N, L − 1] float32, aux_loss [] float32 MoE load-balancing loss).
    """
    out = model.forward(batch["tokens"], attention_mask=batch["attention_mask"], return_hidden=True)
    logp, _ = ops.logprobs_from_hidden(out.hidden[:, :-1], model.unembed, batch["tokens"][:, 1:],
                                       chunk_size=chunk_size, mask=batch["mask"][:, 1:])
    mask = batch["mask"][:, 1:]
    sums = ops.masked_sum(logp, mask, axis=-1)
    lengths = jnp.sum(mask, axis=-1)
    return sums, lengths, logp, jnp.asarray(out.aux_loss, jnp.float32)


def dpo_objective(
    pi_sums: jax.Array,
    ref_sums: jax.Array,
    lengths: jax.Array,
    config: DPOConfig,
    *,
    chosen_nll: jax.Array | None = None,
    labels: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The preference loss on summed sequence log-probs of a ``[2B]`` batch.

    For loss_kind "simpo", "orpo" (which needs ``chosen_nll`` []) and "kto" (which needs
    ``labels`` [B]) see ``_objective_other``; what follows is the DPO kinds.

    With length_normalize the policy and reference sums are divided by the response
    length (a row with no response token counts as length 1). Reference log-probs are
    constants (stop-gradient, inside ``ops.dpo_loss``); reference_free sets them to 0.

    Args:
      pi_sums: [2B] float32 policy Σ log π over each response (chosen rows first).
      ref_sums: [2B] float32 reference sums (ignored when reference_free).
      lengths: [2B] float32 response lengths in tokens.
      config: DPOConfig (beta, loss_kind, label_smoothing, length_normalize, reference_free).

    Returns:
      (loss, metrics): ``ops.dpo_loss`` metrics plus ``logps_chosen``, ``logps_rejected``
      (policy, as used in the loss), ``ref_logps_chosen``, ``ref_logps_rejected`` and
      ``kl_chosen``: the per-token mean of log π − log π_ref over chosen response tokens
      (the k1 estimator; chosen responses are data, not samples of π, so this measures
      drift from the reference rather than an unbiased KL).
    """
    if config.loss_kind not in ops.DPO_KINDS:
        return _objective_other(pi_sums, ref_sums, lengths, config, chosen_nll=chosen_nll, labels=labels)
    ref_sums = jax.lax.stop_gradient(jnp.zeros_like(pi_sums) if config.reference_free else ref_sums)
    lengths = jax.lax.stop_gradient(lengths)
    if config.length_normalize:
        denom = jnp.maximum(lengths, 1.0)
        pi, ref = pi_sums / denom, ref_sums / denom
    else:
        pi, ref = pi_sums, ref_sums
    pi_c, pi_r = jnp.split(pi, 2)
    ref_c, ref_r = jnp.split(ref, 2)
    loss, metrics = ops.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=config.beta, kind=config.loss_kind,
                                 label_smoothing=config.label_smoothing)
    n_c = jnp.split(lengths, 2)[0]
    log_ratio_c = jax.lax.stop_gradient(jnp.split(pi_sums - ref_sums, 2)[0])
    metrics.update(
        logps_chosen=jax.lax.stop_gradient(jnp.mean(pi_c)),
        logps_rejected=jax.lax.stop_gradient(jnp.mean(pi_r)),
        ref_logps_chosen=jnp.mean(ref_c),
        ref_logps_rejected=jnp.mean(ref_r),
        kl_chosen=jnp.sum(log_ratio_c) / jnp.maximum(jnp.sum(n_c), 1.0),
    )
    return loss, metrics


def _objective_other(pi_sums, ref_sums, lengths, config: DPOConfig, *, chosen_nll=None, labels=None):
    """SimPO / ORPO / KTO on summed sequence log-probs of a ``[2B]`` batch.

    simpo: ``ops.simpo_loss`` (chosen rows first; ref_sums unused);
    orpo:  ``ops.orpo_loss`` with ``chosen_nll`` [] (ref_sums unused);
    kto:   rows 0..B−1 are the completions (``labels`` [B]), rows B..2B−1 the mismatched
           KL rows: z0 = ``ops.kto_reference_point`` of the KL rows, then ``ops.kto_loss``
           (z0 is a constant, so the KL rows get no gradient).
    """
    lengths = jax.lax.stop_gradient(lengths)
    pi_c, pi_r = jnp.split(pi_sums, 2)
    n_c, n_r = jnp.split(lengths, 2)
    if config.loss_kind == "simpo":
        return ops.simpo_loss(pi_c, pi_r, n_c, n_r, beta=config.beta, gamma=config.simpo_gamma,
                              label_smoothing=config.label_smoothing)
    if config.loss_kind == "orpo":
        if chosen_nll is None:
            raise ValueError("loss_kind='orpo' needs chosen_nll (the NLL of the chosen responses)")
        return ops.orpo_loss(pi_c, pi_r, n_c, n_r, chosen_nll, lam=config.beta)
    if labels is None:
        raise ValueError("loss_kind='kto' needs labels [B] (1.0: desirable completion)")
    ref_c, ref_kl = jnp.split(jax.lax.stop_gradient(ref_sums), 2)
    z0 = ops.kto_reference_point(pi_r, ref_kl)
    loss, metrics = ops.kto_loss(pi_c, ref_c, labels, z0, beta=config.beta,
                                 desirable_weight=config.kto_desirable_weight,
                                 undesirable_weight=config.kto_undesirable_weight)
    metrics["logps"] = jax.lax.stop_gradient(jnp.mean(pi_c))
    metrics["ref_logps"] = jnp.mean(ref_c)
    return loss, metrics


def dpo_forward_loss(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    ref_sums: jax.Array,
    config: DPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The trainer's loss: one policy forward over ``[2B, L]`` → ``dpo_objective``
    (+ sft_weight · token-mean NLL of the chosen responses, + MoE aux loss).

    Args:
      model: the policy (CausalLM).
      batch: tokens, attention_mask, mask — ``[2B, L]``, chosen rows first.
      ref_sums: [2B] float32 reference Σ log π_ref per response (see ``sequence_logprobs``).
      config: DPOConfig.

    Returns:
      (loss, metrics) with ``pref_loss`` (the DPO-family term; for ORPO the whole ORPO
      loss, its parts in ``nll`` and ``or_loss``) and, when sft_weight > 0, ``sft_loss``.
    """
    sums, lengths, token_logp, aux = sequence_logprobs(model, batch, config.logprob_chunk_size)
    b = token_logp.shape[0] // 2
    chosen_nll = None
    if config.loss_kind == "orpo":
        chosen_nll, _ = ops.sft_loss(token_logp[:b], batch["mask"][:b, 1:], "token_mean")
    loss, metrics = dpo_objective(sums, ref_sums, lengths, config, chosen_nll=chosen_nll, labels=batch.get("labels"))
    metrics["pref_loss"] = loss
    if config.sft_weight:
        nll, _ = ops.sft_loss(token_logp[:b], batch["mask"][:b, 1:], "token_mean")
        loss = loss + config.sft_weight * nll
        metrics["sft_loss"] = nll
    if config.moe_aux_coef:
        loss = loss + config.moe_aux_coef * aux
        metrics["moe_aux_loss"] = aux
    return loss, metrics


def _make_ref_fn(ref_split: SplitModel, chunk_size: int):
    def ref_fn(ref_params, batch):
        sums, _, _, _ = sequence_logprobs(ref_split.merge(ref_params), batch, chunk_size)
        return jax.lax.stop_gradient(sums)

    return jax.jit(ref_fn)


def _make_update(split: SplitModel, tx, config: DPOConfig, ref_split: SplitModel | None, placement: Placement):
    """Jitted step. With ``ref_split`` the reference sums are computed inside the step from
    ``ref_params``; otherwise they come in ``batch["ref_sums"]`` (cache or reference-free).
    The new params and optimizer state keep their sharding on ``placement``'s mesh."""

    def update(params, opt_state, batch, ref_params, frozen=None):
        if ref_split is not None:
            sums, _, _, _ = sequence_logprobs(ref_split.merge(ref_params), batch, config.logprob_chunk_size)
            ref_sums = jax.lax.stop_gradient(sums)
        else:
            ref_sums = batch["ref_sums"]

        def loss_fn(p):
            full = apply_lora(frozen, p, config.lora) if config.lora.enabled else p
            return dpo_forward_loss(split.merge(full), batch, ref_sums, config)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, opt_state, finite = apply_if_finite(tx, params, opt_state, grads, loss)
        params, opt_state = placement.constrain((params, opt_state))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return params, opt_state, finite, {"loss": loss, "grad_norm": grad_norm, **metrics}

    return jax.jit(update)


# ---------------------------------------------------------------------------- reference cache


def precompute_reference_logprobs(
    reference: Any, loader: PreferenceLoader, config: DPOConfig, pad_token_id: int,
    placement: Placement | None = None,
) -> np.ndarray:
    """Σ log π_ref of the chosen and rejected response of every pair, computed once.

    Batches of ``config.batch_size`` pairs padded to ``config.max_len`` (one compilation;
    the last batch is filled with copies of the first pair and those rows are discarded),
    their ``[2B, L]`` rows split over the mesh's data × fsdp.

    Args:
      reference: the frozen reference model (or a local checkpoint path).
      loader: the training PreferenceLoader (its tokenized pairs ``loader.items``).
      config: DPOConfig.
      pad_token_id: the tokenizer's pad id.
      placement: the run's placement (default: one built from ``config.mesh``); the
        reference is placed on its mesh (in place).

    Returns:
      [len(loader.records), 2] float32 (chosen, rejected) sums, indexed like
      ``loader.records`` (rows of pairs not trained on are NaN); the same on every process.
    """
    b = config.batch_size
    placement = placement or make_placement(config.mesh, reference, {"batch_size": b})
    ref_split = split_model(placed_model(reference, placement))
    ref_fn = _make_ref_fn(ref_split, config.logprob_chunk_size)
    out = np.full((len(loader.records), 2), np.nan, np.float32)
    for chunk, n in _fixed_batches(loader.items, b):
        batch = collate_pairs(chunk, pad_token_id=pad_token_id, bucket="max", max_len=config.max_len)
        with placement.context():
            sums = ref_fn(ref_split.params, placement.rows(batch_arrays(batch)))
        sums = placement.to_host(sums)  # [2B]: small, whole on every process
        for k, ex in enumerate(chunk[:n]):
            out[ex.index] = (sums[k], sums[b + k])
    return out


def _fixed_batches(items: Sequence[Any], b: int):
    """Yields (b items, number of real ones): the last batch is filled with copies of
    the first item so every batch has one shape."""
    for start in range(0, len(items), b):
        chunk = list(items[start:start + b])
        n = len(chunk)
        yield chunk + [items[0]] * (b - n), n


# ---------------------------------------------------------------------------- train


def train(
    config: DPOConfig,
    *,
    policy: Any,
    tokenizer: Any,
    preferences: Any,
    reference: Any = None,
) -> TrainResult:
    """Trains ``policy`` on preference pairs with the DPO family.

    Args:
      config: DPOConfig.
      policy: CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or CharTokenizer (shared by policy and reference).
      preferences: pairwise records ``{prompt, chosen, rejected, label?}`` and/or k-wise
        records ``{prompt, responses, ranking | scores}`` (expanded into pairs, ties
        dropped), prompts and responses as strings or chat messages; a list of dicts, a
        ``datasets`` object, or a local .jsonl / .json / .parquet file or
        ``save_to_disk`` directory. With loss_kind "kto": unpaired records
        ``{prompt, completion, label: bool}`` (TRL's format).
      reference: frozen reference model or checkpoint path (default: the initial policy
        parameters — jax arrays are immutable, so nothing is copied). Unused when
        reference_free; an error with loss_kind "simpo" / "orpo" (reference-free: no
        reference model is loaded or kept).

    Returns:
      TrainResult (trained model, sharded on ``config.mesh``; per-step metrics,
      output_dir). A given policy / reference model is placed on the mesh in place, a
      checkpoint path is loaded straight into its sharding. ``output_dir`` also holds
      ``data_stats.json`` (PreferenceDataStats) and, with precompute_reference,
      ``reference_logprobs.npz``.
    """
    # Every split array holds 2B rows (chosen then rejected): B dividing data × fsdp suffices.
    _check_reference_given(config, reference)
    check_tokenizer_fits(policy, tokenizer)
    check_tokenizer_fits(reference, tokenizer)
    placement = make_placement(config.mesh, policy, {"batch_size": config.batch_size})
    model = placed_model(policy, placement)
    if config.loss_kind == "kto":
        loader, data_stats = make_unpaired_loader(config, tokenizer, preferences)
    else:
        loader, data_stats = make_preference_loader(config, tokenizer, preferences)
    batches = _IndexedLoader(loader)
    split = split_model(model)
    tx = make_optimizer(config.optim, config.run.total_steps)
    frozen = split.params if config.lora.enabled else None
    trainable = init_lora(split.params, config.lora, jax.random.PRNGKey(config.run.seed)) if frozen else split.params
    state = placement.place({"params": trainable, "opt_state": tx.init(trainable)})
    loop = TrainLoop(config, config.run, desc="dpo")
    if loop.is_writer:
        (loop.output_dir / DATA_STATS).write_text(json.dumps(dataclasses.asdict(data_stats), indent=1))

    ref_split = ref_params = cache = None
    if uses_reference(config):
        ref_model = placed_model(reference, placement) if reference is not None else None
        if config.precompute_reference:
            cache = _load_or_compute_cache(ref_model or model, loader, config, loop.output_dir, pad_id(tokenizer),
                                           placement)
            del ref_model  # the reference is not needed any more
        else:
            ref_split = split_model(ref_model) if ref_model is not None else split
            ref_params = ref_split.params
    update = _make_update(split, tx, config, ref_split, placement)

    state, start = loop.start(state)
    if "loader" in loop.meta:
        batches.load_state_dict(loop.meta["loader"])
    for step in range(start, config.run.total_steps):
        t0 = time.perf_counter()
        batch, indices = next(batches)
        arrays = batch_arrays(batch)
        if ref_split is None:
            if cache is not None:
                arrays["ref_sums"] = np.concatenate([cache[indices, 0], cache[indices, 1]])
            else:
                arrays["ref_sums"] = np.zeros((2 * len(indices),), np.float32)
        arrays = placement.rows(arrays)
        with placement.context():
            params, opt_state, finite, metrics = update(state["params"], state["opt_state"], arrays, ref_params,
                                                        frozen)
        state = {"params": params, "opt_state": opt_state}
        finite, metrics = placement.to_host((finite, metrics))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["tokens_per_s"] = _num_tokens(batch) / max(time.perf_counter() - t0, 1e-9)
        loop.end_step(step, state, metrics, finite=bool(finite), meta={"loader": batches.state_dict()})
    final = apply_lora(frozen, state["params"], config.lora) if frozen else state["params"]
    return loop.finish(state, model=split.merge(final), tokenizer=tokenizer)


def _check_reference_given(config: DPOConfig, reference: Any) -> None:
    if reference is not None and config.loss_kind in REFERENCE_FREE_KINDS:
        raise ValueError(f"reference= must be None with loss_kind={config.loss_kind!r}: the loss is "
                         "reference-free, so no reference model is loaded or kept")


def _load_or_compute_cache(reference: nnx.Module, loader: PreferenceLoader, config: DPOConfig,
                           output_dir: Path, pad_token_id: int, placement: Placement) -> np.ndarray:
    """The reference cache: read back from output_dir when resuming (same data), else
    computed on the mesh (every process holds all of it; process 0 writes the file)."""
    path = output_dir / REFERENCE_CACHE
    if config.run.resume and path.exists():
        with np.load(path) as f:
            cache = f["sums"]
        if cache.shape == (len(loader.records), 2):
            return cache
        logger.warning("ignoring %s: shape %s does not match %d pairs", path, cache.shape, len(loader.records))
    t0 = time.perf_counter()
    cache = precompute_reference_logprobs(reference, loader, config, pad_token_id, placement)
    logger.info("reference log-probs of %d pairs computed in %.1fs", len(loader.items), time.perf_counter() - t0)
    if jax.process_index() == 0:  # one writer on a shared output_dir
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, sums=cache)
        tmp.replace(path)
    return cache


def evaluate(
    config: DPOConfig,
    *,
    policy: Any,
    tokenizer: Any,
    preferences: Any,
    reference: Any = None,
) -> dict[str, float]:
    """Preference metrics of ``policy`` over a whole dataset (no update), e.g. a held-out set.

    Runs on ``config.mesh`` (batch_size must divide by data × fsdp): the policy and the
    reference are placed there (in place; a no-op for models already there), the rows of
    every batch split over data × fsdp; only the per-pair values come back to the host.

    Returns:
      pair means of ``reward_accuracy``, ``reward_margin``, ``chosen_reward``,
      ``rejected_reward`` and ``logp_accuracy``: the fraction of pairs where the policy
      alone gives the chosen response a higher log-prob (length-normalised when
      configured) than the rejected one; ``ties``: the fraction of pairs whose implicit
      reward margin is exactly 0 (every pair when the policy is the reference); and
      ``num_pairs``. A tie counts 0.5 in both accuracies (a coin flip, as a tie is
      scored elsewhere), not as a wrong preference, so the reference model scores 0.5.
    """
    b = config.batch_size
    if config.loss_kind == "kto":
        raise ValueError("evaluate does not support loss_kind='kto' yet (it scores preference pairs)")
    _check_reference_given(config, reference)
    check_tokenizer_fits(policy, tokenizer)
    check_tokenizer_fits(reference, tokenizer)
    placement = make_placement(config.mesh, policy, {"batch_size": b})
    model = placed_model(policy, placement)
    loader, _ = make_preference_loader(config, tokenizer, preferences, shuffle=False)
    split = split_model(model)
    ref_split = None
    if uses_reference(config):
        ref_split = split_model(placed_model(reference, placement)) if reference is not None else split

    @jax.jit
    def per_pair(params, ref_params, batch):
        sums, lengths, _, _ = sequence_logprobs(split.merge(params), batch, config.logprob_chunk_size)
        ref = jnp.zeros_like(sums) if ref_split is None else \
            sequence_logprobs(ref_split.merge(ref_params), batch, config.logprob_chunk_size)[0]
        normalize = config.length_normalize or config.loss_kind in REFERENCE_FREE_KINDS  # SimPO / ORPO: always
        norm = jnp.maximum(lengths, 1.0) if normalize else 1.0
        pc, pr = jnp.split(sums / norm, 2)
        rc, rr = jnp.split(config.beta * (sums - ref) / norm, 2)
        return {"reward_accuracy": ops.tie_half_accuracy(rc, rr), "reward_margin": rc - rr, "chosen_reward": rc,
                "rejected_reward": rr, "logp_accuracy": ops.tie_half_accuracy(pc, pr),
                "ties": (rc == rr).astype(jnp.float32)}

    values: dict[str, list] = {}
    for chunk, n in _fixed_batches(loader.items, b):
        batch = collate_pairs(chunk, pad_token_id=pad_id(tokenizer), bucket="max", max_len=config.max_len)
        with placement.context():
            out = per_pair(split.params, None if ref_split is None else ref_split.params,
                           placement.rows(batch_arrays(batch)))
        for k, v in placement.to_host(out).items():  # [B] per pair
            values.setdefault(k, []).append(v[:n])
    result = {k: float(np.mean(np.concatenate(v))) for k, v in values.items()}
    result["num_pairs"] = len(loader.items)
    return result
