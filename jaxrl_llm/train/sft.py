"""Supervised fine-tuning: next-token NLL on response tokens only.

Shapes: B batch rows, L tokens per row, T = L − 1 predicted positions.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.records import validate_records
from jaxrl_llm.data.padding import check_bucket
from jaxrl_llm.data.sft import ASSISTANT_TURNS, SFTBatch, SFTLoader
from jaxrl_llm.train.guard import apply_if_finite
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, init_lora
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.microbatch import accumulated_value_and_grad, row_weights
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.train.policy import SplitModel, check_tokenizer_fits, make_placement, placed_model, split_model
from jaxrl_llm.train.validation import check_positive_ints


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Configuration of supervised fine-tuning.

    Attributes:
      run, optim: loop and optimizer settings.
      batch_size: rows per step.
      max_len: tokens per example (prompt + response), longer ones truncated.
      bucket: row-length rounding ("max": always max_len, compiles once).
      pack: several examples per row (segment-masked attention, positions restart).
      loss_agg: ``aggregate_loss`` mode over response tokens.
      add_bos: prepend the tokenizer's bos to every example.
      assistant_turns: "last" (the loss covers a conversation's last assistant turn,
        earlier turns are prompt text) or "all" (every assistant turn, the conversation
        tokenized exactly like a multi-turn rollout's episode; ``data.sft``).
      logprob_chunk_size: tokens per chunk of ``logprobs_from_hidden``.
      lora: low-rank adapters instead of full fine-tuning (rank 0: off).
      microbatches: run each update's batch as this many forward/backward passes whose
        gradients add up to the whole batch's exactly (``train.microbatch``): less
        activation memory, the same update.
      mesh: device mesh (data × fsdp × tensor); batch_size / microbatches must divide by
        data × fsdp.
    """

    run: RunConfig = RunConfig(output_dir="runs/sft")
    optim: OptimConfig = OptimConfig(learning_rate=1e-4)
    batch_size: int = 16
    max_len: int = 256
    bucket: int | str = "max"
    pack: bool = False
    loss_agg: str = "token_mean"
    add_bos: bool = False
    assistant_turns: str = "last"
    logprob_chunk_size: int = 1024
    lora: LoRAConfig = LoRAConfig()
    microbatches: int = 1
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("batch_size", "max_len", "logprob_chunk_size", "microbatches"))
        if self.batch_size % self.microbatches:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by microbatches={self.microbatches}")
        if self.loss_agg not in ops.AGGREGATION_MODES:
            raise ValueError(f"loss_agg must be one of {ops.AGGREGATION_MODES}, got {self.loss_agg!r}")
        check_bucket(self.bucket)
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {self.assistant_turns!r}")


def sft_forward_loss(model: nnx.Module, batch: dict, agg: str, chunk_size: int, packed: bool = False):
    """NLL of each token given the previous ones, on response tokens only.

    Args:
      batch: tokens, attention_mask, positions, segment_ids, loss_mask — all [B, L].
      packed: rows hold several examples; attention is restricted to each example's
        own tokens through ``segment_ids``.
    """
    segments = {"segment_ids": batch["segment_ids"]} if packed else {}
    out = model.forward(batch["tokens"], batch["positions"], attention_mask=batch["attention_mask"],
                        return_hidden=True, **segments)
    logp, _ = ops.logprobs_from_hidden(out.hidden[:, :-1], model.unembed, batch["tokens"][:, 1:], chunk_size=chunk_size,
                                       mask=batch["loss_mask"][:, 1:])
    return ops.sft_loss(logp, batch["loss_mask"][:, 1:], agg)


def make_sft_update(split: SplitModel, tx, loss_agg: str, chunk_size: int, packed: bool = False,
                    lora: LoRAConfig | None = None, placement: Placement | None = None, microbatches: int = 1):
    """Jitted SFT step (shared by SFT and RFT):
    (params, opt_state, batch[, frozen]) → (params, opt_state, finite, metrics).

    With ``lora`` enabled, ``params`` are the adapters and ``frozen`` the base params. With a
    ``placement``, the new params and optimizer state keep their sharding. With
    ``microbatches`` > 1 the batch runs as that many forward/backward passes."""

    def update(params, opt_state, batch, frozen=None):
        def loss_fn(p, b):
            full = p if lora is None or not lora.enabled else apply_lora(frozen, p, lora)
            return sft_forward_loss(split.merge(full), b, loss_agg, chunk_size, packed)

        targets = batch["loss_mask"][:, 1:]
        (loss, metrics), grads = accumulated_value_and_grad(
            loss_fn, params, batch, row_weights(targets, loss_agg), microbatches,
            metric_weights={"nll": row_weights(targets, "token_mean"), "num_tokens": None})
        metrics["perplexity"] = jnp.exp(metrics["nll"])  # exp of the whole batch's token-mean NLL
        params, opt_state, finite = apply_if_finite(tx, params, opt_state, grads, loss)
        if placement is not None:
            params, opt_state = placement.constrain((params, opt_state))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return params, opt_state, finite, {"loss": loss, "grad_norm": grad_norm, **metrics}

    return jax.jit(update)


def batch_arrays(batch: SFTBatch) -> dict:
    return {f.name: jnp.asarray(getattr(batch, f.name)) for f in dataclasses.fields(batch)}


def train(
    config: SFTConfig,
    *,
    policy: Any,
    tokenizer: Any,
    examples: Sequence[dict],
) -> TrainResult:
    """Fine-tunes ``policy`` on prompt/response records (strings or chat messages, or
    ``messages`` conversations); the loss covers response tokens (and eos) only.

    Args:
      config: SFTConfig.
      policy: CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or CharTokenizer.
      examples: records ``{prompt, response}`` or ``{messages}``.

    Returns:
      TrainResult (model, per-step metrics, output_dir).
    """
    validate_records(examples)
    rows = ({"batch_size": config.batch_size} if config.microbatches == 1
            else {"batch_size / microbatches": config.batch_size // config.microbatches})
    check_tokenizer_fits(policy, tokenizer)
    placement = make_placement(config.mesh, policy, rows)
    model = placed_model(policy, placement)
    loader = SFTLoader(examples, tokenizer, config.batch_size, max_len=config.max_len, seed=config.run.seed,
                       pack=config.pack, bucket=config.bucket, add_bos=config.add_bos,
                       assistant_turns=config.assistant_turns)
    split = split_model(model)
    tx = make_optimizer(config.optim, config.run.total_steps)
    update = make_sft_update(split, tx, config.loss_agg, config.logprob_chunk_size, config.pack, config.lora,
                             placement, config.microbatches)
    frozen = split.params if config.lora.enabled else None
    trainable = init_lora(split.params, config.lora, jax.random.PRNGKey(config.run.seed)) if frozen else split.params
    state = placement.place({"params": trainable, "opt_state": tx.init(trainable)})
    loop = TrainLoop(config, config.run, desc="sft")
    state, start = loop.start(state)
    if "loader" in loop.meta:
        loader.load_state_dict(loop.meta["loader"])
    for step in range(start, config.run.total_steps):
        t0 = time.perf_counter()
        host_batch = next(loader)
        tokens = float(np.sum(host_batch.loss_mask))
        batch = placement.rows(batch_arrays(host_batch))
        with placement.context():
            params, opt_state, finite, metrics = update(state["params"], state["opt_state"], batch, frozen)
        state = {"params": params, "opt_state": opt_state}
        finite, metrics = placement.to_host((finite, metrics))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
        loop.end_step(step, state, metrics, finite=bool(finite), meta={"loader": loader.state_dict()})
    final = apply_lora(frozen, state["params"], config.lora) if frozen else state["params"]
    return loop.finish(state, model=split.merge(final), tokenizer=tokenizer)
