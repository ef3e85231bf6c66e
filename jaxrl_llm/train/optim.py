"""Optimizer factory: clip by global norm → AdamW with warmup + constant/cosine/linear
decay, optionally accumulating gradients over micro-steps (``optax.MultiSteps``)."""

from __future__ import annotations

import dataclasses

import optax

from jaxrl_llm.train.validation import check_int_field, check_real

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW settings shared by every trainer.

    Attributes:
      learning_rate: peak learning rate (0: a frozen control run: the loop, sampling and
        metrics run, the weights do not move).
      schedule: decay after warmup, one of SCHEDULES.
      warmup_steps: linear warmup from 0 to the peak.
      min_lr_ratio: final learning rate as a fraction of the peak (cosine / linear).
      weight_decay: AdamW decoupled weight decay.
      b1, b2, eps: Adam moments.
      max_grad_norm: clip by global norm (None: no clipping).
      grad_accum_steps: micro-steps accumulated per update (optax.MultiSteps: the mean of
        the micro-steps' gradients, each already a mean over its own batch).
    """

    learning_rate: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        check_real("learning_rate", self.learning_rate, low=0)
        for name in ("b1", "b2"):
            check_real(name, getattr(self, name), low=0, high=1, high_open=True, why="an Adam moment decay")
        check_real("eps", self.eps, low=0, low_open=True, why="it keeps Adam's division finite")
        check_real("weight_decay", self.weight_decay, low=0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_int_field("warmup_steps", self.warmup_steps, 0)
        check_real("min_lr_ratio", self.min_lr_ratio, low=0, high=1,
                   why="the final learning rate as a fraction of the peak")
        check_real("max_grad_norm", self.max_grad_norm, low=0, low_open=True, optional=True, finite=False,
                   why="the global-norm clip; None: no clipping")
        check_int_field("grad_accum_steps", self.grad_accum_steps, 1)


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer update: linear warmup, then the configured decay."""
    peak, warmup = config.learning_rate, config.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    end = peak * config.min_lr_ratio
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """optax.chain(clip_by_global_norm, adamw(schedule)), wrapped in MultiSteps if asked."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    tx = optax.chain(*parts)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx
