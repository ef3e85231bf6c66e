"""Command line entry point: ``jaxrl-llm <stage> [--config file.yaml] [key=value ...]``.

Each stage builds the same frozen config dataclass a notebook would (YAML file, then
``key=value`` overrides with dotted keys for nested fields, e.g. ``run.total_steps=50``
``optim.learning_rate=1e-5``) and calls the same ``train`` function, so a terminal run and
a notebook run are the same run. Inputs are local paths only (no hub downloads):

  --policy   HF checkpoint directory, or ``tiny:<family>`` for a fresh tiny model
  --tokenizer  HF tokenizer directory, or ``char`` for the built-in CharTokenizer
  --data     JSONL / JSON / parquet file or a saved ``datasets`` directory
  --reward   a built-in reward function name (arithmetic, math, think_answer_format), or
             your own ``path/to/file.py:function`` / ``package.module:function``

Every stage first calls ``parallel.init_distributed()`` (a no-op on one host; under
SLURM, on a TPU pod slice or with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` set, it starts JAX's multi-process runtime), and ``mesh.data=…
mesh.fsdp=… mesh.tensor=…`` choose the device mesh of the run.

``jaxrl-llm grpo`` with no inputs runs the built-in quick-start (tiny model, SFT warm
start, RL on single-digit addition).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# transformers, imported for tokenizers only, would announce on every run that PyTorch
# (which jaxrl_llm never uses) is missing.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jaxrl_llm


def _rewards() -> dict[str, Any]:
    from jaxrl_llm import rewards

    return {
        "arithmetic": rewards.arithmetic_reward,
        "math": rewards.math_accuracy_reward,
        "think_answer_format": rewards.format_reward(),
    }


def _load_policy(spec: str):
    if spec.startswith("tiny:"):
        from flax import nnx

        from jaxrl_llm.models import CausalLM, tiny_config

        return CausalLM(tiny_config(spec.split(":", 1)[1]), rngs=nnx.Rngs(0))
    from jaxrl_llm.models import load_hf

    return load_hf(spec)[0]


def _load_tokenizer(spec: str):
    if spec == "char":
        from jaxrl_llm.models import CharTokenizer

        return CharTokenizer()
    from jaxrl_llm.models import load_tokenizer

    return load_tokenizer(spec)


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"jaxrl-llm {args.command}: missing {', '.join(missing)}")


def _demo(args: argparse.Namespace) -> int:
    """A worked example of the core math on a tiny batch (no model needed)."""
    import numpy as np

    from jaxrl_llm import ops

    scores = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)  # 2 prompts × G=4
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]] * 4, np.float32)
    out = {
        "grpo_advantages": ops.group_advantages(scores, 4, "group").tolist(),
        "dr_grpo_advantages": ops.group_advantages(scores, 4, "none").tolist(),
        "rloo_advantages": ops.rloo_advantages(scores, 4).tolist(),
        "overlong_penalty_L=[10,14,17,25]": ops.overlong_penalty(np.array([10, 14, 17, 25]), 20, 8).tolist(),
        "token_mean_vs_seq_mean": {
            mode: float(ops.aggregate_loss(np.ones_like(mask) * np.arange(8)[:, None], mask, mode))
            for mode in ops.AGGREGATION_MODES
        },
    }
    print(json.dumps(out, indent=2))
    return 0


def _sft(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import sft
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data")
    config = load_config(sft.SFTConfig, args.config, args.overrides)
    examples = load_records(args.data, required=())
    result = sft.train(config, policy=_load_policy(args.policy), tokenizer=_load_tokenizer(args.tokenizer), examples=examples)
    _finish(result)
    return 0


def _grpo(args: argparse.Namespace) -> int:
    from jaxrl_llm.train import grpo
    from jaxrl_llm.train.config import from_dict, load_config_dict

    if args.policy is None and args.data is None:
        from jaxrl_llm.train import quickstart

        summary = quickstart.run(args.preset, args.out, args.quick)
        print(json.dumps(summary, indent=2))
        return 0
    _require(args, "policy", "tokenizer", "data", "reward")
    from jaxrl_llm.data import load_records

    # The preset supplies the recipe; fields given in the file or as overrides win.
    given = load_config_dict(args.config, args.overrides)
    typed = from_dict(grpo.GRPOConfig, given)
    config = grpo.GRPOConfig.preset(args.preset, **{k: getattr(typed, k) for k in given})
    result = grpo.train(config, policy=_load_policy(args.policy), tokenizer=_load_tokenizer(args.tokenizer),
                        prompts=load_records(args.data), reward_fn=_reward(args.reward))
    _finish(result)
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import dpo
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data")
    config = load_config(dpo.DPOConfig, args.config, args.overrides)
    preferences = load_records(args.data, required=("prompt",))
    result = dpo.train(config, policy=_load_policy(args.policy), tokenizer=_load_tokenizer(args.tokenizer),
                       preferences=preferences)
    _finish(result)
    return 0


def _rft(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import rft
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data", "reward")
    config = load_config(rft.RFTConfig, args.config, args.overrides)
    result = rft.train(config, policy=_load_policy(args.policy), tokenizer=_load_tokenizer(args.tokenizer),
                       prompts=load_records(args.data), reward_fn=_reward(args.reward))
    _finish(result)
    return 0


def _reward_model(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import reward_model
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data")
    config = load_config(reward_model.RewardConfig, args.config, args.overrides)
    result = reward_model.train(config, model=_load_policy(args.policy), tokenizer=_load_tokenizer(args.tokenizer),
                                preferences=load_records(args.data, required=("prompt",)))
    _finish(result)
    return 0


def _ppo(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import ppo
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data")
    if args.reward is None and args.reward_model is None:
        raise SystemExit("jaxrl-llm ppo: give --reward-model (a reward checkpoint) and/or --reward (a function name)")
    config = load_config(ppo.PPOConfig, args.config, args.overrides)
    result = ppo.train(config, policy=_load_policy(args.policy), tokenizer=_load_tokenizer(args.tokenizer),
                       prompts=load_records(args.data), reward_model=args.reward_model,
                       reward_fn=None if args.reward is None else _reward(args.reward))
    _finish(result)
    return 0


def _reward(name: str):
    rewards = _rewards()
    if name in rewards:
        return rewards[name]
    if ":" in name:
        return _import_function(name)
    raise SystemExit(
        f"--reward must be one of {sorted(rewards)} or path/to/file.py:function or "
        f"package.module:function, got {name!r}"
    )


def _import_function(spec: str):
    """``path/to/file.py:function`` or ``package.module:function`` → the function."""
    import importlib
    import importlib.util
    from pathlib import Path

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise SystemExit(f"--reward {spec!r}: file {target!r} not found")
        module_spec = importlib.util.spec_from_file_location(f"_jaxrl_llm_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise SystemExit(f"--reward {spec!r}: cannot import module {target!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SystemExit(f"--reward {spec!r}: {target!r} has no function {attr!r}")
    return fn


def _finish(result) -> None:
    last = result.history[-1] if result.history else {}
    print(json.dumps({"output_dir": str(result.output_dir), "steps": len(result.history), "last": last}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jaxrl_llm {jaxrl_llm.__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="print a worked example of the RL math")
    demo.set_defaults(func=_demo)

    def stage(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML file with config fields")
        p.add_argument("--policy", help="HF checkpoint dir or tiny:<family>")
        p.add_argument("--tokenizer", help="HF tokenizer dir or 'char'")
        p.add_argument("--data", help="JSONL / JSON / parquet / saved datasets dir")
        p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys nest)")
        p.set_defaults(func=func)
        return p

    stage("sft", _sft, "supervised fine-tuning on prompt/response records")
    g = stage("grpo", _grpo, "GRPO / Dr. GRPO / DAPO / GSPO / RLOO with a verifiable reward")
    g.add_argument("--preset", default="grpo", help="grpo | dr_grpo | dapo | gspo | rloo")
    g.add_argument("--reward", help="built-in reward name, path/to/file.py:function or module:function")
    g.add_argument("--out", default="results", help="quick-start output root (no --policy/--data)")
    g.add_argument("--quick", action="store_true", help="quick-start: a few steps only")
    stage("dpo", _dpo, "DPO / cDPO / robust / IPO / hinge on prompt/chosen/rejected records")
    r = stage("rft", _rft, "rejection-sampling fine-tuning with a reward function")
    r.add_argument("--reward", help="built-in reward name, path/to/file.py:function or module:function")
    stage("reward", _reward_model, "reward model (Bradley–Terry / Plackett–Luce) on preference records")
    p = stage("ppo", _ppo, "PPO with GAE, KL-shaped rewards and a critic")
    p.add_argument("--reward", help="built-in reward name, path/to/file.py:function or module:function")
    p.add_argument("--reward-model", dest="reward_model", help="reward model checkpoint directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors propagate as exceptions (the Python entry point)."""
    args = build_parser().parse_args(argv)
    if args.command != "demo":
        from jaxrl_llm.parallel import init_distributed

        init_distributed()  # before any JAX computation; a no-op on one host
    return args.func(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or environment causes: shown as one message, not a traceback."""
    from jaxrl_llm.train.guard import NonFiniteError
    from jaxrl_llm.train.loop import TrainingInterrupted

    return (ValueError, OSError, NonFiniteError, TrainingInterrupted)


def run(argv: list[str] | None = None) -> int:
    """The ``jaxrl-llm`` command: like :func:`main`, but a bad config, path or input ends
    with its message on stderr and exit code 2; ``--debug`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except _user_errors() as err:
        if debug:
            raise
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"jaxrl-llm {command}: error: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
