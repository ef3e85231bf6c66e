"""Trainers (one per algorithm family) and the loop core they share."""

from jaxrl_llm.train.checkpoint import Checkpointer
from jaxrl_llm.train.config import load_config, save_config
from jaxrl_llm.train.guard import NonFiniteError, NonFiniteGuard, all_finite, apply_if_finite
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.metrics import MetricsLogger, read_metrics
from jaxrl_llm.train.optim import OptimConfig, make_optimizer, make_schedule

__all__ = [
    "Checkpointer",
    "MetricsLogger",
    "NonFiniteError",
    "NonFiniteGuard",
    "OptimConfig",
    "RunConfig",
    "TrainLoop",
    "TrainResult",
    "all_finite",
    "apply_if_finite",
    "load_config",
    "make_optimizer",
    "make_schedule",
    "read_metrics",
    "save_config",
]
