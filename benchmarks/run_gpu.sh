#!/usr/bin/env bash
# The GPU benchmark suite at GPU sizes (each script compares side by side in one run).
# Usage: bash benchmarks/run_gpu.sh [quick|rollout|prefill|tunix|rest]
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ $what == quick ]]; then
  python benchmarks/rollout.py --quick --batch 2 --group 1 2
  python benchmarks/train_step.py --quick
  python benchmarks/logprobs.py --quick
  python benchmarks/gae.py --quick
  python benchmarks/end_to_end.py --quick
  exit
fi
# Llama-style models big enough that decoding and the update are not launch-bound:
# rollout 16 layers, d=1024, V=32000 (0.27B, bf16); train step 24 layers (0.37B)
if [[ $what == all || $what == rollout ]]; then
  python benchmarks/rollout.py --layers 16 --dim 1024 --dtype bfloat16 --batch 1 4 16 64 --group 4 --reps 2
  python benchmarks/rollout.py --layers 16 --dim 1024 --dtype bfloat16 --batch 4 --group 1 16 --reps 2
fi
if [[ $what == all || $what == prefill ]]; then  # long prompts: the same 16 rows as 16 prompts × 1 or 1 × 16
  python benchmarks/rollout.py --layers 16 --dim 1024 --dtype bfloat16 --prompt-len 2048 --new-tokens 64 \
    --batch 16 1 --group 1 --reps 3
  python benchmarks/rollout.py --layers 16 --dim 1024 --dtype bfloat16 --prompt-len 2048 --new-tokens 64 \
    --batch 1 --group 16 --reps 3
fi
if [[ $what == all || $what == tunix ]]; then  # needs google-tunix importable
  python benchmarks/rollout.py --layers 16 --dim 1024 --dtype bfloat16 --batch 4 16 --group 4 --reps 2 --tunix
fi
if [[ $what == all || $what == rest ]]; then
  python benchmarks/gae.py
  python benchmarks/logprobs.py
  python benchmarks/train_step.py --layers 24 --dim 1024 --vocab 32000 --heads 16 --kv-heads 4 \
    --rows 16 --prompt-len 64 --len 448 --reps 3 --logprob-chunk 1024
  python benchmarks/end_to_end.py --layers 8 --dim 512 --prompts 32 --group 8 --new-tokens 128 --steps 6
fi
