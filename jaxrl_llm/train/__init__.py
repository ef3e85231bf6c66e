"""Trainers (one per algorithm family) and the loop core they share.

Each stage is a module with a frozen config dataclass and a ``train`` function:
``sft``, ``reward_model``, ``ppo``, ``grpo``, ``dpo``, ``rft``; plus the RLHF data stages
``candidates`` (sample K responses per prompt) and ``preference_data`` (judge them into
pairwise / k-wise preference records).
"""

from jaxrl_llm.train import candidates, dpo, grpo, ppo, preference_data, reward_model, rft, sft
from jaxrl_llm.train.checkpoint import Checkpointer
from jaxrl_llm.train.config import load_config, save_config
from jaxrl_llm.train.dpo import DPOConfig
from jaxrl_llm.train.grpo import GRPOConfig
from jaxrl_llm.train.guard import NonFiniteError, NonFiniteGuard, all_finite, apply_if_finite
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.metrics import MetricsLogger, read_metrics
from jaxrl_llm.train.optim import OptimConfig, make_optimizer, make_schedule
from jaxrl_llm.train.ppo import PPOConfig
from jaxrl_llm.train.reward_model import RewardConfig
from jaxrl_llm.train.rft import RFTConfig
from jaxrl_llm.train.sft import SFTConfig

__all__ = [
    "Checkpointer",
    "DPOConfig",
    "GRPOConfig",
    "MetricsLogger",
    "NonFiniteError",
    "NonFiniteGuard",
    "OptimConfig",
    "PPOConfig",
    "RFTConfig",
    "RewardConfig",
    "RunConfig",
    "SFTConfig",
    "TrainLoop",
    "TrainResult",
    "all_finite",
    "apply_if_finite",
    "candidates",
    "dpo",
    "grpo",
    "load_config",
    "make_optimizer",
    "make_schedule",
    "ppo",
    "preference_data",
    "read_metrics",
    "reward_model",
    "rft",
    "save_config",
    "sft",
]
