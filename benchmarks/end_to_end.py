"""Benchmark: where a GRPO iteration's time goes — sampling (generate + reward), old /
reference log-probs, and the policy update — from the per-step timings the trainer logs.

Runs `jaxrl_llm.train.grpo.train` on the built-in arithmetic task with a random tiny
Llama (no warm start needed: this measures time, not learning). Step 0 (compilation) is
reported separately; the fractions are medians over the remaining steps.

Usage:
  python benchmarks/end_to_end.py --quick
  python benchmarks/end_to_end.py --steps 10 --prompts 16 --group 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from benchmarks.common import emit, run_metadata  # noqa: E402
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config  # noqa: E402
from jaxrl_llm.rewards.arithmetic import arithmetic_reward, make_arithmetic_dataset  # noqa: E402
from jaxrl_llm.train import grpo  # noqa: E402
from jaxrl_llm.train.loop import RunConfig  # noqa: E402

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--inner-updates", type=int, default=2)
    parser.add_argument("--preset", default="grpo", choices=grpo.PRESETS)
    parser.add_argument("--quick", action="store_true", help="3 steps, 4 prompts × 4, 16 tokens, d=64")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.group, args.new_tokens, args.layers, args.dim = 3, 4, 4, 16, 2, 64

    model = CausalLM(tiny_config("llama", hidden_size=args.dim, intermediate_size=args.dim * 2, num_layers=args.layers,
                                 num_heads=4, num_kv_heads=2, head_dim=args.dim // 4), rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as out:
        config = grpo.GRPOConfig.preset(
            args.preset, run=RunConfig(output_dir=out, total_steps=args.steps, progress=False, export_hf=False),
            prompts_per_step=args.prompts, group_size=args.group, max_prompt_len=8, max_new_tokens=args.new_tokens,
            num_inner_updates=args.inner_updates, kl_coef=0.04)
        result = grpo.train(config, policy=model, tokenizer=CharTokenizer(),
                            prompts=make_arithmetic_dataset(256, 0), reward_fn=arithmetic_reward)
    rows = result.history
    parts = ("time_sampling", "time_logprobs", "time_update")
    warm = rows[1:] or rows
    medians = {p: statistics.median(r[p] for r in warm) for p in parts}
    total = sum(medians.values())
    row = {
        "bench": "end_to_end", "preset": args.preset, "steps": args.steps, "prompts": args.prompts,
        "group": args.group, "new_tokens": args.new_tokens, "layers": args.layers, "dim": args.dim,
        "inner_updates": args.inner_updates,
        "first_step_s": sum(rows[0][p] for p in parts),
        **{f"{p}_s": medians[p] for p in parts},
        **{f"fraction_{p.removeprefix('time_')}": medians[p] / total for p in parts},
        "response_length_mean": statistics.median(r["response_length_mean"] for r in warm),
        **run_metadata(args.quick),
    }
    emit("end_to_end", row, save=not args.no_save)


if __name__ == "__main__":
    main()
