"""Every config checks its fields and their cross-field constraints when it is constructed
(in Python, from YAML or from CLI overrides), not when the first update is traced: clip
bounds, dual clip > 1, GAE γ / λ in [0, 1], coefficients >= 0 and finite (NaN / inf
rejected), sampling options, fractions, batch splits, and fields that only act together
(a field another setting ignores is an error, not a silent no-op).

The cases extend the bad-input registry of test_bad_inputs.py (same ``test_bad_input*``
test names, counted together in docs/reliability.md):
    pytest --collect-only -q tests/reliability/test_bad_inputs.py \\
        tests/reliability/test_culprit_errors.py \\
        tests/reliability/test_config_constraints.py | grep -c "::test_bad_input"
Each message must name the field, the value given and what is expected.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.train.candidates import CandidateConfig
from jaxrl_llm.train.config import load_config
from jaxrl_llm.train.distill import DistillConfig
from jaxrl_llm.train.dpo import DPOConfig
from jaxrl_llm.train.grpo import PRESETS, GRPOConfig
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.online_dpo import OnlineDPOConfig
from jaxrl_llm.train.lora import LoRAConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.ppo import PPOConfig
from jaxrl_llm.train.reward_model import RewardConfig
from jaxrl_llm.train.rft import RFTConfig
from jaxrl_llm.train.sft import SFTConfig

NAN, INF = float("nan"), float("inf")
GSPO = dict(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4)
ADAPTIVE = dict(kl_schedule="adaptive")

# (case id, config class, field values, regex the message must match: field, expectation, value)
CASES = [
    # ---- GRPOConfig: clipping
    ("grpo-clip_low=1", GRPOConfig, dict(clip_low=1.0), r"clip_low must be in \[0, 1\) \(.*\), got 1.0"),
    ("grpo-clip_low<0", GRPOConfig, dict(clip_low=-0.1), r"clip_low must be in \[0, 1\) .*got -0.1"),
    ("grpo-clip_low-nan", GRPOConfig, dict(clip_low=NAN), r"clip_low must be in \[0, 1\) .*got nan"),
    ("grpo-clip_high<0", GRPOConfig, dict(clip_high=-0.2), r"clip_high must be >= 0 .*got -0.2"),
    ("grpo-clip_high-nan", GRPOConfig, dict(clip_high=NAN), r"clip_high must be >= 0 .*got nan"),
    ("grpo-gspo-clip_low=1", GRPOConfig, {**GSPO, "clip_low": 1.0}, r"clip_low must be in \[0, 1\) .*got 1.0"),
    ("grpo-dual_clip<1", GRPOConfig, dict(dual_clip=0.5), r"dual_clip must be > 1 or None \(dual-clip PPO bounds .*\), got 0.5"),
    ("grpo-dual_clip=1", GRPOConfig, dict(dual_clip=1.0), r"dual_clip must be > 1 or None .*got 1.0"),
    ("grpo-dual_clip-inf", GRPOConfig, dict(dual_clip=INF), r"dual_clip must be finite or None .*got inf"),
    ("grpo-dual_clip-with-gspo", GRPOConfig, {**GSPO, "dual_clip": 3.0},
     r"dual_clip=3.0 applies to policy_loss='ppo' only; policy_loss='gspo' ignores it"),
    # ---- GRPOConfig: loss weights
    ("grpo-kl_coef-nan", GRPOConfig, dict(kl_coef=NAN), r"kl_coef must be >= 0 .*got nan"),
    ("grpo-kl_coef-inf", GRPOConfig, dict(kl_coef=INF), r"kl_coef must be finite .*got inf"),
    ("grpo-entropy_coef<0", GRPOConfig, dict(entropy_coef=-0.01), r"entropy_coef must be >= 0 .*got -0.01"),
    ("grpo-moe_aux_coef<0", GRPOConfig, dict(moe_aux_coef=-1.0), r"moe_aux_coef must be >= 0 .*got -1.0"),
    ("grpo-router_z_coef-nan", GRPOConfig, dict(router_z_coef=NAN), r"router_z_coef must be >= 0 .*got nan"),
    ("grpo-norm_length=0", GRPOConfig, dict(norm_length=0),
     r"norm_length must be >= 1 or None \(None: max_new_tokens\), got 0"),
    ("grpo-overlong_factor<0", GRPOConfig, dict(overlong_buffer=8, overlong_factor=-1.0),
     r"overlong_factor must be >= 0 .*got -1.0"),
    ("grpo-overlong_buffer-float", GRPOConfig, dict(overlong_buffer=2.5), r"overlong_buffer must be an int, got 2.5"),
    ("grpo-tis_cap=0", GRPOConfig, dict(tis_cap=0.0), r"tis_cap must be > 0 or None .*got 0.0"),
    ("grpo-tis_cap-nan", GRPOConfig, dict(tis_cap=NAN), r"tis_cap must be > 0 or None .*got nan"),
    ("grpo-tis_cap-with-gspo", GRPOConfig, {**GSPO, "tis_cap": 2.0},
     r"tis_cap=2.0 applies to policy_loss='ppo' only; policy_loss='gspo' ignores it"),
    ("grpo-reward_default-nan", GRPOConfig, dict(reward_default=NAN), r"reward_default must be a finite number or None .*got nan"),
    # ---- GRPOConfig: asynchronous sampling and placement
    ("grpo-placement", GRPOConfig, dict(placement="split"),
     r"placement must be one of \('colocated', 'disaggregated'\), got 'split'"),
    ("grpo-sampler_mesh-colocated", GRPOConfig, dict(sampler_mesh=MeshConfig(num_devices=4)),
     r"sampler_mesh is set but placement='colocated' samples on the trainer's mesh"),
    ("grpo-reward_workers=0", GRPOConfig, dict(reward_workers=0), r"reward_workers: expected an int >= 1 .*got 0"),
    ("grpo-reward_workers-float", GRPOConfig, dict(reward_workers=2.0), r"reward_workers: expected an int >= 1 .*got 2.0"),
    ("ppo-placement", PPOConfig, dict(placement="split"),
     r"placement must be one of \('colocated', 'disaggregated'\), got 'split'"),
    ("ppo-reward_workers=0", PPOConfig, dict(reward_workers=0), r"reward_workers: expected an int >= 1 .*got 0"),
    ("ppo-max_staleness<0", PPOConfig, dict(max_staleness=-1), r"max_staleness must be >= 0"),
    ("ppo-tis_cap=0", PPOConfig, dict(tis_cap=0.0), r"tis_cap must be > 0 or None .*got 0.0"),
    # ---- GRPOConfig: sampling, sizes
    ("grpo-temperature-nan", GRPOConfig, dict(temperature=NAN), r"temperature must be > 0 .*got nan"),
    ("grpo-top_p=0", GRPOConfig, dict(top_p=0.0), r"top_p must be in \(0, 1\] \(1 disables top-p\), got 0.0"),
    ("grpo-top_p>1", GRPOConfig, dict(top_p=1.5), r"top_p must be in \(0, 1\] .*got 1.5"),
    ("grpo-top_k<0", GRPOConfig, dict(top_k=-1), r"top_k must be an int >= 0 .*got -1"),
    ("grpo-top_k-float", GRPOConfig, dict(top_k=2.5), r"top_k must be an int >= 0 .*got 2.5"),
    ("grpo-stop_token_ids-negative", GRPOConfig, dict(stop_token_ids=(2, -1)),
     r"stop_token_ids must be token ids \(ints >= 0\), got \[2, -1\] \(bad: \[-1\]\)"),
    ("grpo-max_new_tokens-float", GRPOConfig, dict(max_new_tokens=64.5), r"max_new_tokens must be an int, got 64.5"),
    ("grpo-minibatch-not-divisible-by-microbatches", GRPOConfig, dict(prompts_per_step=2, group_size=2, microbatches=3),
     r"prompts_per_step \* group_size / minibatches = 4 must be divisible by microbatches=3"),
    # ---- PPOConfig
    ("ppo-clip_low=1", PPOConfig, dict(clip_low=1.0), r"clip_low must be in \[0, 1\) .*got 1.0"),
    ("ppo-clip_high<0", PPOConfig, dict(clip_high=-0.1), r"clip_high must be >= 0 .*got -0.1"),
    ("ppo-dual_clip=1", PPOConfig, dict(dual_clip=1.0), r"dual_clip must be > 1 or None .*got 1.0"),
    ("ppo-value_clip=0", PPOConfig, dict(value_clip=0.0), r"value_clip must be > 0 or None .*got 0.0"),
    ("ppo-value_clip-nan", PPOConfig, dict(value_clip=NAN), r"value_clip must be > 0 or None .*got nan"),
    ("ppo-reward_clip-nan", PPOConfig, dict(reward_clip=NAN), r"reward_clip must be > 0 or None .*got nan"),
    ("ppo-vf_coef-nan", PPOConfig, dict(vf_coef=NAN), r"vf_coef must be >= 0 .*got nan"),
    ("ppo-vf_coef-inf", PPOConfig, dict(vf_coef=INF), r"vf_coef must be finite .*got inf"),
    ("ppo-entropy_coef<0", PPOConfig, dict(entropy_coef=-0.01), r"entropy_coef must be >= 0 .*got -0.01"),
    ("ppo-gamma-nan", PPOConfig, dict(gamma=NAN), r"gamma must be in \[0, 1\] \(the GAE discount\), got nan"),
    ("ppo-lam>1", PPOConfig, dict(lam=1.05), r"lam must be in \[0, 1\] \(the GAE λ\), got 1.05"),
    ("ppo-lam<0", PPOConfig, dict(lam=-0.5), r"lam must be in \[0, 1\] .*got -0.5"),
    ("ppo-kl_coef-nan", PPOConfig, dict(kl_coef=NAN), r"kl_coef must be >= 0 .*got nan"),
    ("ppo-kl_coef_final<0", PPOConfig, dict(kl_schedule="linear", kl_coef_final=-0.1), r"kl_coef_final must be >= 0 or None .*got -0.1"),
    ("ppo-kl_coef_final-ignored", PPOConfig, dict(kl_coef_final=0.01),
     r"kl_coef_final=0.01 applies to kl_schedule='linear' only; kl_schedule='fixed' ignores it"),
    ("ppo-kl_target=0", PPOConfig, {**ADAPTIVE, "kl_target": 0.0}, r"kl_target must be > 0 .*got 0.0"),
    ("ppo-kl_horizon-nan", PPOConfig, {**ADAPTIVE, "kl_horizon": NAN}, r"kl_horizon must be > 0 .*got nan"),
    ("ppo-missing_eos_penalty<0", PPOConfig, dict(missing_eos_penalty=-1.0), r"missing_eos_penalty must be >= 0 or None .*got -1.0"),
    ("ppo-reward_default-inf", PPOConfig, dict(reward_default=INF), r"reward_default must be finite or None .*got inf"),
    ("ppo-temperature-nan", PPOConfig, dict(temperature=NAN), r"temperature must be > 0 .*got nan"),
    ("ppo-top_p>1", PPOConfig, dict(top_p=2.0), r"top_p must be in \(0, 1\] .*got 2.0"),
    ("ppo-replay_capacity-float", PPOConfig, dict(replay_capacity=8.5), r"replay_capacity must be an int .*got 8.5"),
    ("ppo-minibatch-not-divisible-by-microbatches", PPOConfig, dict(prompts_per_step=4, minibatches=2, microbatches=3),
     r"minibatch of 2 rows must be divisible by microbatches=3"),
    # ---- DPOConfig
    ("dpo-beta-nan", DPOConfig, dict(beta=NAN), r"beta must be > 0 \(β, .*\), got nan"),
    ("dpo-beta-inf", DPOConfig, dict(beta=INF), r"beta must be finite .*got inf"),
    ("dpo-label_smoothing-nan", DPOConfig, dict(label_smoothing=NAN), r"label_smoothing must be in \[0, 0.5\) .*got nan"),
    ("dpo-label_smoothing<0", DPOConfig, dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0.5\) .*got -0.1"),
    ("dpo-sft_weight-inf", DPOConfig, dict(sft_weight=INF), r"sft_weight must be finite .*got inf"),
    ("dpo-moe_aux_coef<0", DPOConfig, dict(moe_aux_coef=-0.1), r"moe_aux_coef must be >= 0 .*got -0.1"),
    # ---- RFTConfig
    ("rft-reward_threshold-nan", RFTConfig, dict(reward_threshold=NAN), r"reward_threshold must be a number \(not NaN\) or None .*got nan"),
    ("rft-max_per_prompt-ignored", RFTConfig, dict(max_per_prompt=4),
     r'max_per_prompt=4 applies to selection="threshold" only; selection="best" keeps one candidate'),
    ("rft-temperature-nan", RFTConfig, dict(temperature=NAN), r"temperature must be > 0 .*got nan"),
    ("rft-top_p=0", RFTConfig, dict(top_p=0.0), r"top_p must be in \(0, 1\] .*got 0.0"),
    ("rft-top_k<0", RFTConfig, dict(top_k=-5), r"top_k must be an int >= 0 .*got -5"),
    ("rft-stop_token_ids-float", RFTConfig, dict(stop_token_ids=(1.5,)), r"stop_token_ids must be token ids \(ints >= 0\), got \[1.5\]"),
    # ---- SFTConfig
    ("sft-bucket=0", SFTConfig, dict(bucket=0), r"bucket=0; expected None, a positive int, or one of \('pow2', 'max'\)"),
    ("sft-bucket-name", SFTConfig, dict(bucket="pow3"), r"bucket='pow3'; expected None, a positive int"),
    ("sft-batch-not-divisible-by-microbatches", SFTConfig, dict(batch_size=6, microbatches=4),
     r"batch_size=6 must be divisible by microbatches=4"),
    ("sft-batch_size-float", SFTConfig, dict(batch_size=8.0), r"batch_size must be an int, got 8.0"),
    # ---- RewardConfig
    ("rm-tie_eps<0", RewardConfig, dict(tie_eps=-0.1), r"tie_eps must be >= 0 .*got -0.1"),
    ("rm-margin-nan", RewardConfig, dict(margin=NAN), r"margin must be a finite number .*got nan"),
    ("rm-margin-inf", RewardConfig, dict(margin=INF), r"margin must be finite .*got inf"),
    ("rm-center_coef-nan", RewardConfig, dict(center_coef=NAN), r"center_coef must be >= 0 .*got nan"),
    ("rm-length_penalty-inf", RewardConfig, dict(length_penalty=INF), r"length_penalty must be finite .*got inf"),
    ("rm-bucket=-1", RewardConfig, dict(bucket=-1), r"bucket=-1; expected None, a positive int"),
    ("rm-margin_field-empty", RewardConfig, dict(margin_field=""), r"margin_field must be a record field name or None, got ''"),
    # ---- CandidateConfig (temperature 0 is greedy decoding here)
    ("cand-temperature<0", CandidateConfig, dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\), got -0.5"),
    ("cand-top_p>1", CandidateConfig, dict(top_p=1.5), r"top_p must be in \(0, 1\] .*got 1.5"),
    ("cand-min_p>1", CandidateConfig, dict(min_p=1.5), r"min_p must be in \[0, 1\] .*got 1.5"),
    ("cand-top_k-float", CandidateConfig, dict(top_k=4.0), r"top_k must be an int >= 0 .*got 4.0"),
    ("cand-stop_token_ids-negative", CandidateConfig, dict(stop_token_ids=(-3,)), r"stop_token_ids must be token ids \(ints >= 0\)"),
    ("cand-seed-float", CandidateConfig, dict(seed=1.5), r"seed must be an int \(the sampling seed\), got 1.5"),
    ("cand-max_ngram_repetition-nan", CandidateConfig, dict(max_ngram_repetition=NAN),
     r"max_ngram_repetition must be in \[0, 1\) or None .*got nan"),
    # ---- OptimConfig
    ("optim-learning_rate-inf", OptimConfig, dict(learning_rate=INF), r"learning_rate must be finite, got inf"),
    ("optim-weight_decay-inf", OptimConfig, dict(weight_decay=INF), r"weight_decay must be finite, got inf"),
    ("optim-min_lr_ratio-nan", OptimConfig, dict(min_lr_ratio=NAN), r"min_lr_ratio must be in \[0, 1\] .*got nan"),
    ("optim-min_lr_ratio>1", OptimConfig, dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\] .*got 1.5"),
    ("optim-max_grad_norm-nan", OptimConfig, dict(max_grad_norm=NAN), r"max_grad_norm must be > 0 or None .*got nan"),
    ("optim-max_grad_norm=0", OptimConfig, dict(max_grad_norm=0.0), r"max_grad_norm must be > 0 or None .*got 0.0"),
    ("optim-warmup_steps-float", OptimConfig, dict(warmup_steps=1.5), r"warmup_steps must be an int, got 1.5"),
    ("optim-b2-nan", OptimConfig, dict(b2=NAN), r"b2 must be in \[0, 1\) .*got nan"),
    # ---- LoRAConfig
    ("lora-alpha-nan", LoRAConfig, dict(rank=4, alpha=NAN), r"alpha must be > 0 .*got nan"),
    ("lora-alpha=0", LoRAConfig, dict(rank=4, alpha=0.0), r"alpha must be > 0 .*got 0.0"),
    ("lora-targets-empty", LoRAConfig, dict(rank=4, targets=()), r"targets must be a non-empty list of parameter names when rank > 0 .*got \(\)"),
    ("lora-rank<0", LoRAConfig, dict(rank=-1), r"rank must be >= 0 \(0: LoRA off\), got -1"),
    # ---- RunConfig
    ("run-max_consecutive_nonfinite=0", RunConfig, dict(max_consecutive_nonfinite=0), r"max_consecutive_nonfinite must be >= 1 .*got 0"),
    ("run-keep_checkpoints=0", RunConfig, dict(keep_checkpoints=0), r"keep_checkpoints must be >= 1, got 0"),
    ("run-total_steps-float", RunConfig, dict(total_steps=10.5), r"total_steps must be an int, got 10.5"),
    # ---- MeshConfig: with num_devices the device count is known at construction
    ("mesh-sizes-do-not-multiply-to-num_devices", MeshConfig, dict(data=2, fsdp=2, num_devices=2),
     r"mesh.num_devices=2, but mesh.data × mesh.fsdp × mesh.tensor = 2 × 2 × 1 = 4"),
    ("mesh-num_devices-not-divisible", MeshConfig, dict(data=-1, fsdp=3, num_devices=4),
     r"mesh.num_devices=4 is not divisible by 3, the product of the sizes other than mesh.data=-1"),
    # ---- multi-turn episodes (GRPO / PPO), distillation, online DPO, the new DPO kinds
    ("grpo-max_turns=0", GRPOConfig, dict(max_turns=0), r"max_turns must be >= 1 \(assistant messages per episode\), got 0"),
    ("grpo-max_total_tokens<max_new_tokens", GRPOConfig, dict(max_new_tokens=16, max_total_tokens=8),
     r"max_total_tokens must be >= 16 or None .*got 8"),
    ("grpo-env-not-a-spec", GRPOConfig, dict(env=3), r"env must be a factory spec string .*got 3"),
    ("grpo-env-with-overlong", GRPOConfig, dict(env="m:f", overlong_buffer=4),
     r"overlong_buffer=4 penalises single responses; with env='m:f'"),
    ("ppo-env-with-reward_norm", PPOConfig, dict(env="m:f", reward_norm=True),
     r"\['reward_norm'\] act on single-response scores; with env='m:f'"),
    ("distill-lmbda>1", DistillConfig, dict(lmbda=1.5), r"lmbda must be in \[0, 1\] .*got 1.5"),
    ("distill-divergence", DistillConfig, dict(divergence="kl"), r"divergence must be one of .*got 'kl'"),
    ("distill-beta-nan", DistillConfig, dict(beta=NAN), r"beta must be in \[0, 1\] .*got nan"),
    ("distill-temperature=0", DistillConfig, dict(distill_temperature=0.0),
     r"distill_temperature must be > 0 .*got 0.0"),
    ("distill-teacher_top_k=0", DistillConfig, dict(teacher_top_k=0), r"teacher_top_k must be >= 1 or None .*got 0"),
    ("online_dpo-samples_per_prompt=1", OnlineDPOConfig, dict(samples_per_prompt=1),
     r"samples_per_prompt must be >= 2 \(a pair needs two answers\), got 1"),
    ("online_dpo-loss_kind", OnlineDPOConfig, dict(loss_kind="kto"), r"loss_kind must be one of .*got 'kto'"),
    ("online_dpo-temperature=0", OnlineDPOConfig, dict(temperature=0.0), r"temperature must be > 0 .*got 0.0"),
]


@pytest.mark.parametrize("case, cls, fields, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_config(case, cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)


# The same checks hold for a config read from YAML / CLI overrides (the constructor runs).
LOADED_CASES = [
    ("cli-grpo-dual_clip", GRPOConfig, ["dual_clip=0.5"], r"dual_clip must be > 1 or None .*got 0.5"),
    ("cli-ppo-lam", PPOConfig, ["lam=1.5"], r"lam must be in \[0, 1\] .*got 1.5"),
    ("cli-grpo-placement", GRPOConfig, ["placement=remote"], r"placement must be one of .*got 'remote'"),
    ("cli-dpo-optim-max_grad_norm", DPOConfig, ["optim.max_grad_norm=-1"], r"max_grad_norm must be > 0 or None .*got -1"),
]


@pytest.mark.parametrize("case, cls, overrides, message", LOADED_CASES, ids=[c[0] for c in LOADED_CASES])
def test_bad_input_config_override(case, cls, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(cls, overrides=overrides)


CONFIGS = [GRPOConfig, PPOConfig, DPOConfig, RFTConfig, SFTConfig, RewardConfig, CandidateConfig, DistillConfig,
           OnlineDPOConfig, OptimConfig, LoRAConfig, RunConfig, MeshConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=[c.__name__ for c in CONFIGS])
def test_default_config_constructs(cls):
    config = cls()
    assert dataclasses.replace(config) == config  # the checks run again on replace


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("max_new_tokens", [64, 1024])
def test_every_preset_constructs(name, max_new_tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dapo's short-budget warning
        config = GRPOConfig.preset(name, max_new_tokens=max_new_tokens)
    assert dataclasses.replace(config) == config


def test_legitimate_edge_values_construct():
    """The checks do not reject what the code runs correctly with."""
    GRPOConfig(kl_coef=0.0, entropy_coef=0.0, clip_low=0.0, clip_high=0.0, dual_clip=1.5, tis_cap=2.0,
               reward_default=0.0, top_k=5, top_p=0.9, stop_token_ids=(0, 7))
    GRPOConfig.preset("dr_grpo", norm_length=512)
    GRPOConfig(norm_length=512)  # the CLI types the given fields with the defaults before the preset applies
    GRPOConfig(clip_high=float("inf"))  # no upper clip
    PPOConfig(gamma=0.0, lam=1.0, value_clip=None, vf_coef=0.0, kl_coef=0.0, reward_clip=5.0, missing_eos_penalty=0.0,
              kl_schedule="linear", kl_coef_final=0.0)
    PPOConfig(kl_schedule="adaptive", kl_target=1.0, kl_horizon=1000.0)
    DPOConfig(loss_kind="robust", label_smoothing=0.49, beta=1e-3)
    RFTConfig(selection="threshold", reward_threshold=-1.0, max_per_prompt=4)
    RFTConfig(reward_threshold=None)
    CandidateConfig(temperature=0.0, min_p=0.1, min_length=0, max_length=None, seed=-1)
    OptimConfig(learning_rate=0.0, min_lr_ratio=1.0, max_grad_norm=None, b1=0.0)
    LoRAConfig(rank=0, targets=())  # LoRA off: targets unused
    RunConfig(checkpoint_every=0, max_consecutive_nonfinite=1)
    MeshConfig(data=-1, fsdp=2, num_devices=4)
    MeshConfig(1, 1, 1, num_devices=1)
    RewardConfig(margin=-0.5, tie_eps=0.1, bucket=None)
