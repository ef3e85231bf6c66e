"""GRPO quick-start (same as `jaxrl-llm grpo` with no inputs): SFT warm start, then
GRPO-family RL on single-digit addition; see jaxrl_llm/train/quickstart.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import experiment_args

from jaxrl_llm.train import grpo, quickstart

if __name__ == "__main__":
    parser = experiment_args(quickstart.__doc__.splitlines()[0])
    parser.add_argument("--preset", default="grpo", choices=grpo.PRESETS)
    args = parser.parse_args()
    quickstart.run(args.preset, args.out, args.quick, args.seed)
