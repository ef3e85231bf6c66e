"""Reward-model training: a backbone with a scalar head, fitted to preferences.

Pairwise data ({prompt, chosen, rejected, label?}) uses the Bradley–Terry loss (optional
margin and reward centring); k-wise data ({prompt, responses, ranking|scores}) uses the
Plackett–Luce loss over the K responses ranked best → worst (K = 2 is Bradley–Terry).
The reward of a sequence is the head's value at the last valid token of prompt +
response (``pool="last"``) or its mean over valid tokens (``pool="mean"``, a length
normalisation); an optional length penalty subtracts α·(response tokens) from the reward
the loss sees, so the head learns the part of the preference length does not explain.
Held-out pairs give pairwise accuracy and ROC AUC. The trained model is saved as a
``*ForSequenceClassification`` checkpoint (``models.hf_io.save_hf``), loadable by
``load_hf(kind="reward")`` and by ``transformers``.

Shapes: B pairs (or prompts, k-wise) per step, K responses per prompt, L tokens per row.

References:
  Ouyang et al. 2022, InstructGPT (reward model), https://arxiv.org/abs/2203.02155
  Touvron et al. 2023, Llama 2 (margin), https://arxiv.org/abs/2307.09288
  Eisenstein et al. 2023, Helping or Herding? (reward centring), https://arxiv.org/abs/2312.09244
  Zhu et al. 2023, Principled RLHF from pairwise or K-wise comparisons, https://arxiv.org/abs/2301.11270
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.preferences import (
    OVERLONG_PREFERENCE_POLICIES,
    TIE_POLICIES,
    KwiseBatch,
    PreferenceBatch,
    PreferenceLoader,
)
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.padding import check_bucket
from jaxrl_llm.models.heads import RewardModel, ScalarHeadModel
from jaxrl_llm.models.layer_stacking import is_stacked
from jaxrl_llm.models.transformer import CausalLM
from jaxrl_llm.parallel.placement import MeshConfig, Placement, forward_rows
from jaxrl_llm.train.guard import apply_if_finite
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.train.validation import check_int_field, check_positive_ints, check_real
from jaxrl_llm.train.policy import check_tokenizer_fits, make_placement, placed_model, split_model

LOSSES = ("bradley_terry", "plackett_luce")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Configuration of reward-model training.

    Attributes:
      run, optim: loop and optimizer settings.
      loss: "bradley_terry" (pairwise batches; k-wise records are expanded into pairs)
        or "plackett_luce" (k-wise batches [B, K, L]; every record k-wise with one K).
      batch_size: pairs (Bradley–Terry) or prompts (Plackett–Luce) per step.
      max_len: longest prompt + response in tokens.
      bucket: row-length rounding ("max": always max_len, compiles once).
      overlong: "truncate" | "error" | "drop" for examples over max_len.
      ties: k-wise → pairs: "drop" tied pairs or keep them with label 0.5 ("half").
      tie_eps: scores closer than this are ties.
      add_bos, add_eos: special tokens around prompt / response (eos marks the end the
        "last" pooling reads).
      pool: "last" or "mean"; used when ``model`` is built here (from a CausalLM or a
        path), a given ScalarHeadModel keeps its own pooling.
      margin: constant Bradley–Terry margin (Llama 2 uses a per-pair margin).
      margin_field: record field with a per-pair margin added to ``margin`` (None: off).
      center_coef: reward centring weight, center_coef·mean((r_c + r_r)²).
      length_penalty: α; the loss sees r − α·(number of response tokens).
      eval_every: evaluate on held-out pairs every N steps (0: only at the end).
      eval_batch_size: pairs per evaluation forward.
      save_hf: write output_dir/"reward_model" as a sequence-classification checkpoint
        (with the tokenizer's files).
      mesh: device mesh (data × fsdp × tensor); batch_size (and eval_batch_size, with
        held-out records) must divide by data × fsdp.
    """

    run: RunConfig = RunConfig(output_dir="runs/reward_model")
    optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    loss: str = "bradley_terry"
    batch_size: int = 16
    max_len: int = 512
    bucket: int | str = "max"
    overlong: str = "truncate"
    ties: str = "drop"
    tie_eps: float = 0.0
    add_bos: bool = False
    add_eos: bool = True
    pool: str = "last"
    margin: float = 0.0
    margin_field: str | None = None
    center_coef: float = 0.0
    length_penalty: float = 0.0
    eval_every: int = 0
    eval_batch_size: int = 32
    save_hf: bool = True
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("batch_size", "max_len", "eval_batch_size"))
        check_bucket(self.bucket)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.overlong not in OVERLONG_PREFERENCE_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_PREFERENCE_POLICIES}, got {self.overlong!r}")
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {TIE_POLICIES}, got {self.ties!r}")
        if self.pool not in ("last", "mean"):
            raise ValueError(f'pool must be "last" or "mean", got {self.pool!r}')
        check_real("center_coef", self.center_coef, low=0, why="weight of the reward centring term; 0 turns it off")
        check_real("length_penalty", self.length_penalty, low=0,
                   why="α of r - α·(response tokens); 0 turns it off")
        check_int_field("eval_every", self.eval_every, 0, why="0: evaluate only at the end")
        check_real("tie_eps", self.tie_eps, low=0, why="scores closer than this are ties")
        check_real("margin", self.margin, why="the constant Bradley–Terry margin")
        if self.margin_field is not None and not (isinstance(self.margin_field, str) and self.margin_field):
            raise ValueError(f"margin_field must be a record field name or None, got {self.margin_field!r}")
        if self.loss == "plackett_luce" and (self.margin or self.margin_field):
            raise ValueError("margin / margin_field apply to the Bradley–Terry loss only")

    @property
    def kind(self) -> str:
        """The PreferenceLoader kind of the training batches."""
        return "pairwise" if self.loss == "bradley_terry" else "kwise"


# ---------------------------------------------------------------------------- metrics


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of scores separating ``positive`` from ``negative`` (Mann–Whitney U):
    P(a random positive scores above a random negative), ties counting ½."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    allx = np.concatenate([pos, neg])
    order = np.argsort(allx, kind="mergesort")
    ranks = np.empty(allx.size, np.float64)
    sorted_x = allx[order]
    i = 0
    while i < allx.size:  # average ranks over ties
        j = i
        while j + 1 < allx.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def pairwise_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Held-out metrics of a reward model on pairs (ties, label 0.5, are left out).

    Returns:
      {"accuracy": fraction r_c > r_r, "auc": ROC AUC of chosen vs rejected rewards,
       "margin": mean r_c − r_r, "num_pairs": pairs counted}.
    """
    rc, rr = np.asarray(r_chosen, np.float64), np.asarray(r_rejected, np.float64)
    keep = np.ones(rc.shape, bool) if labels is None else np.asarray(labels) != 0.5
    rc, rr = rc[keep], rr[keep]
    if rc.size == 0:
        return {"accuracy": 0.0, "auc": 0.0, "margin": 0.0, "num_pairs": 0}
    return {"accuracy": float(np.mean(rc > rr)), "auc": roc_auc(rc, rr), "margin": float(np.mean(rc - rr)),
            "num_pairs": int(rc.size)}


# ---------------------------------------------------------------------------- model


def as_reward_model(model: Any, pool: str = "last", *, seed: int = 0,
                    placement: Placement | None = None) -> ScalarHeadModel:
    """A ScalarHeadModel as is; a CausalLM → a RewardModel with a copy of its backbone and
    a fresh head; a str → ``load_hf(path, kind="reward", pool=pool)``.

    With a ``placement`` the model is put on its mesh (in place), and a checkpoint path is
    streamed tensor by tensor straight into its sharding."""
    if isinstance(model, str):
        if placement is not None:
            return placed_model(model, placement, kind="reward", pool=pool)
        from jaxrl_llm.models.hf_io import load_hf

        return load_hf(model, kind="reward", pool=pool)[0]
    if isinstance(model, ScalarHeadModel):
        if model.pool == "none":
            raise ValueError('the reward model must pool to one score per sequence (pool "last" or "mean"), got "none"')
        rm = model
    elif isinstance(model, CausalLM):
        rm = RewardModel(model.config, rngs=nnx.Rngs(seed), pool=pool, scan_layers=is_stacked(model))
        nnx.update(rm.model, jax.tree.map(jnp.array, nnx.state(model.model, nnx.Param)))
    else:
        raise ValueError("model must be a RewardModel, a CausalLM or a local checkpoint path, got "
                         f"{type(model).__name__}")
    return rm if placement is None else placed_model(rm, placement)


def _rewards(model: ScalarHeadModel, tokens, attention, response_mask, length_penalty: float):
    """Rewards [R] of rows [R, L] (minus α·response length when length_penalty)."""
    r = model(tokens, attention_mask=attention).astype(jnp.float32)
    if length_penalty:
        r = r - length_penalty * jnp.sum(response_mask.astype(jnp.float32), axis=-1)
    return r


def bradley_terry_batch_loss(model, batch: dict, *, margin_const: float = 0.0, center_coef: float = 0.0,
                             length_penalty: float = 0.0):
    """Bradley–Terry loss of a pairwise batch with soft labels y (1: chosen preferred,
    0.5: tie):  mean(y·ℓ(r_c, r_r) + (1 − y)·ℓ(r_r, r_c)) + center_coef·mean((r_c + r_r)²),
    ℓ = ``ops.bradley_terry_loss`` per pair (−logσ(Δ − margin)); labels all 1 give
    exactly ``ops.bradley_terry_loss`` on the batch.

    ``batch`` holds chosen/rejected ``tokens``, ``attention_mask``, ``mask`` [B, L] (as
    ``PreferenceBatch``), ``labels`` [B] and ``margin`` [B].
    """
    b = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    response = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    r = _rewards(model, tokens, attention, response, length_penalty)
    rc, rr = r[:b], r[b:]
    margin = batch["margin"] + margin_const
    per_pair = jax.vmap(lambda c, x, m: ops.bradley_terry_loss(c[None], x[None], m[None])[0])
    y = batch["labels"]
    losses = y * per_pair(rc, rr, margin) + (1.0 - y) * per_pair(rr, rc, margin)
    loss = jnp.mean(losses)
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(rc + rr))
    metrics = {
        "accuracy": ops.masked_mean((rc > rr).astype(jnp.float32), (y != 0.5).astype(jnp.float32)),
        "margin_mean": jnp.mean(rc - rr),
        "reward_mean": jnp.mean(r),
        "reward_std": jnp.std(r),
    }
    return loss, metrics


def plackett_luce_batch_loss(model, batch: dict, *, length_penalty: float = 0.0):
    """Plackett–Luce loss of a k-wise batch (``KwiseBatch``: [B, K, L], best → worst)."""
    b, k, length = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, length)
    r = _rewards(model, flat(batch["tokens"]), flat(batch["attention_mask"]), flat(batch["mask"]), length_penalty)
    loss, metrics = ops.plackett_luce_loss(r.reshape(b, k))
    return loss, {**metrics, "accuracy": metrics["pairwise_accuracy"], "reward_mean": jnp.mean(r),
                  "reward_std": jnp.std(r)}


# ---------------------------------------------------------------------------- data


class _MarginLoader(PreferenceLoader):
    """PreferenceLoader whose batches also carry each pair's margin ([B] float32)."""

    def __init__(self, *args, margin_field: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        margins = np.zeros(len(self.records), np.float32)
        if margin_field is not None:
            for i, rec in enumerate(self.records):
                value = rec.get(margin_field)
                if value is None:
                    raise ValueError(f"record {i} is missing the margin field {margin_field!r}; fields "
                                     f"present: {sorted(rec)}")
                margins[i] = float(value)
        inner = self.collate
        self.collate = lambda rows, longest: (inner(rows, longest), margins[[ex.index for ex in rows]])


def _arrays(batch: PreferenceBatch | KwiseBatch, margins: np.ndarray | None = None) -> dict:
    """Host arrays of a batch (rows first: [B, ...]), plus ``margin`` [B] for pairs; kept on
    the host so ``Placement.rows`` transfers each process only its own rows."""
    out = {f.name: np.asarray(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    if margins is not None:
        out["margin"] = np.asarray(margins, np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class _LossSpec:
    """Hashable loss options (static argument of the jitted update)."""

    loss: str
    margin: float = 0.0
    center_coef: float = 0.0
    length_penalty: float = 0.0

    @classmethod
    def from_config(cls, config: RewardConfig) -> "_LossSpec":
        return cls(config.loss, config.margin, config.center_coef, config.length_penalty)

    def __call__(self, model, batch):
        if self.loss == "bradley_terry":
            return bradley_terry_batch_loss(model, batch, margin_const=self.margin, center_coef=self.center_coef,
                                            length_penalty=self.length_penalty)
        return plackett_luce_batch_loss(model, batch, length_penalty=self.length_penalty)


@functools.partial(jax.jit, static_argnames=("graph", "tx", "loss_fn", "placement"))
def _update_step(params, opt_state, rest, batch, *, graph, tx, loss_fn, placement: Placement):
    """One optimizer step on a batch whose rows are split over the mesh; the new params and
    optimizer state keep the sharding of their logical names."""
    def f(p):
        return loss_fn(nnx.merge(graph, p, rest), batch)

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    params, opt_state, finite = apply_if_finite(tx, params, opt_state, grads, loss)
    params, opt_state = placement.constrain((params, opt_state))
    return params, opt_state, finite, {"loss": loss, "grad_norm": grad_norm, **metrics}


@functools.partial(jax.jit, static_argnames=("graph",))
def _score_rows(params, rest, tokens, attention, *, graph):
    return nnx.merge(graph, params, rest)(tokens, attention_mask=attention).astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _optimizer(optim: OptimConfig, total_steps: int):
    return make_optimizer(optim, total_steps)


def score_sequences(model: ScalarHeadModel, tokens: np.ndarray, attention_mask: np.ndarray,
                    batch_size: int = 32, placement: Placement | None = None) -> np.ndarray:
    """Rewards [R] of right-padded rows [R, L], in fixed-size forwards (the last one padded).

    With a ``placement`` (the model already on its mesh) every forward's ``batch_size``
    rows are split over data × fsdp (``batch_size`` must divide by it); only the [R]
    rewards come back to the host. Without one the rows go to jit whole, wherever the
    model's params are."""
    split = split_model(model)

    def score(tok, att):
        return _score_rows(split.params, split.rest, tok, att, graph=split.graphdef)

    return forward_rows(score, (tokens, attention_mask), batch_size, placement)


def evaluate(model: ScalarHeadModel, preferences: Sequence[dict], tokenizer, config: RewardConfig,
             placement: Placement | None = None) -> dict:
    """Pairwise accuracy / AUC / margin of ``model`` on held-out preferences (k-wise
    records are expanded into pairs; tied pairs are not counted).

    Runs on ``placement``'s mesh (the training run's), or on ``config.mesh`` (the model is
    placed there in place; eval_batch_size must divide by data × fsdp)."""
    if placement is None:
        placement = make_placement(config.mesh, model, {"eval_batch_size": config.eval_batch_size})
        model = placed_model(model, placement)
    loader = PreferenceLoader(preferences, tokenizer, config.eval_batch_size, max_len=config.max_len,
                              kind="pairwise", shuffle=False, drop_last=False, num_epochs=1, overlong=config.overlong,
                              ties=config.ties, tie_eps=config.tie_eps, bucket="max", add_bos=config.add_bos,
                              add_eos=config.add_eos)
    rc, rr, labels = [], [], []
    for batch in loader:
        scores = score_sequences(model, np.concatenate([batch.chosen_tokens, batch.rejected_tokens]),
                                 np.concatenate([batch.chosen_attention_mask, batch.rejected_attention_mask]),
                                 batch_size=2 * config.eval_batch_size, placement=placement)
        b = len(batch.labels)
        rc.append(scores[:b])
        rr.append(scores[b:])
        labels.append(np.asarray(batch.labels))
    return pairwise_metrics(np.concatenate(rc), np.concatenate(rr), np.concatenate(labels))


# ---------------------------------------------------------------------------- train


def train(
    config: RewardConfig,
    *,
    model: Any,
    tokenizer: Any,
    preferences: Sequence[dict],
    eval_preferences: Sequence[dict] | None = None,
) -> TrainResult:
    """Trains a reward model on preference records.

    Args:
      config: RewardConfig.
      model: a RewardModel / ScalarHeadModel (pool "last" or "mean"), a CausalLM (its
        backbone gets a new scalar head) or a local checkpoint path (``load_hf(kind=
        "reward")``: a sequence-classification checkpoint, or a causal LM whose lm_head is
        replaced by a fresh head).
      tokenizer: HF tokenizer or CharTokenizer (no pad token: eos pads, always masked).
      preferences: pairwise records {prompt, chosen, rejected, label?} and/or k-wise
        records {prompt, responses, ranking | scores}.
      eval_preferences: held-out records for accuracy / AUC (every ``eval_every`` steps
        and at the end, logged as ``eval_accuracy``, ``eval_auc``, ``eval_margin``).

    Returns:
      TrainResult with the trained ScalarHeadModel (sharded on ``config.mesh``, as it
      trained; a given model is placed there in place); ``result.eval`` holds the final
      held-out metrics (or None). With ``config.save_hf`` the model and ``tokenizer`` are
      also written to ``output_dir/reward_model``.
    """
    check_formats(preferences, "preference")
    if eval_preferences is not None:
        check_formats(eval_preferences, "preference")
    rows = {"batch_size": config.batch_size}
    if eval_preferences is not None:
        rows["eval_batch_size"] = config.eval_batch_size  # evaluation splits its rows too
    check_tokenizer_fits(model, tokenizer)
    placement = make_placement(config.mesh, model, rows)
    rm = as_reward_model(model, config.pool, seed=config.run.seed, placement=placement)
    loader = _MarginLoader(preferences, tokenizer, config.batch_size, max_len=config.max_len, kind=config.kind,
                           seed=config.run.seed, overlong=config.overlong, ties=config.ties, tie_eps=config.tie_eps,
                           bucket=config.bucket, add_bos=config.add_bos, add_eos=config.add_eos,
                           margin_field=config.margin_field)
    split = split_model(rm)
    schedule_len = 1 if config.optim.schedule == "constant" else config.run.total_steps
    tx = _optimizer(config.optim, schedule_len)
    loss_fn = _LossSpec.from_config(config)
    state = placement.place({"params": split.params, "opt_state": tx.init(split.params)})
    loop = TrainLoop(config, config.run, desc="reward_model")
    state, start = loop.start(state)
    if "loader" in loop.meta:
        loader.load_state_dict(loop.meta["loader"])

    eval_metrics = None
    for step in range(start, config.run.total_steps):
        t0 = time.perf_counter()
        batch, margins = next(loader)
        arrays = placement.rows(_arrays(batch, margins if config.kind == "pairwise" else None))
        with placement.context():
            params, opt_state, finite, metrics = _update_step(state["params"], state["opt_state"], split.rest,
                                                              arrays, graph=split.graphdef, tx=tx, loss_fn=loss_fn,
                                                              placement=placement)
        state = {"params": params, "opt_state": opt_state}
        finite, metrics = placement.to_host((finite, metrics))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["time_step"] = time.perf_counter() - t0
        last = step + 1 == config.run.total_steps
        if eval_preferences is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            eval_metrics = evaluate(split.merge(params), eval_preferences, tokenizer, config, placement)
            metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        loop.end_step(step, state, metrics, finite=bool(finite), meta={"loader": loader.state_dict()})

    trained = split.merge(state["params"])
    result = loop.finish(state, model=trained, tokenizer=tokenizer)
    result.eval = eval_metrics
    if config.save_hf:
        from jaxrl_llm.models.hf_io import save_hf

        save_hf(trained, str(Path(config.run.output_dir) / "reward_model"), tokenizer=tokenizer)
    return result
