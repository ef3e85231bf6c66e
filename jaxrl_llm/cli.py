"""Command line entry point: ``jaxrl-llm <command> ...``.

Each training stage registers a sub-command that builds its frozen config dataclass and
calls the same ``train`` function a notebook would call.
"""

from __future__ import annotations

import argparse
import json
import sys

import jaxrl_llm


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-llm", description=jaxrl_llm.__doc__)
    parser.add_argument("--version", action="version", version=f"jaxrl_llm {jaxrl_llm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="print a worked example of the RL math")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
