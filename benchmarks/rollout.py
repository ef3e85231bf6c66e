"""Benchmark: sampling throughput of `jaxrl_llm.rollout.generate` vs transformers'
PyTorch `generate`, on the same random Llama-style checkpoint and the same prompts.

Both sample B prompts × G samples of exactly `--new-tokens` tokens (no stop token, so
every row decodes the full budget; top-k / top-p off, temperature 1). Ours prefills each
prompt once and broadcasts its KV cache to the G samples; HF is given the same via
`num_return_sequences=G`. Reported separately: compile time (first call minus a warm
call, ours only), time-to-first-token (prefill + first sample), and steady tokens/s =
B·G·T / wall time of a warm call. The ratio `ratio_tokens_per_s` = ours / HF is measured
in one run on the same machine.

Before timing, greedy outputs are checked equal (first `--check-tokens` tokens), so both
sides run the same model.

Usage:
  python benchmarks/rollout.py --quick                 # 2 layers, d=128, V=4096, T=32
  python benchmarks/rollout.py                         # 8 layers, d=512, V=32000, T=256
  python benchmarks/rollout.py --batch 4 --group 8
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, run_metadata  # noqa: E402
from jaxrl_llm.models import load_hf  # noqa: E402
from jaxrl_llm.rollout import generate  # noqa: E402

def make_checkpoint(path: str, layers: int, dim: int, vocab: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=int(dim * 2.75) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(dim // 64, 2),
                         num_key_value_heads=max(dim // 128, 1), max_position_embeddings=4096)
    LlamaForCausalLM(config).eval().save_pretrained(path)


def time_ours(model, prompts, mask, group, new_tokens, reps, greedy=False):
    kwargs = dict(max_new_tokens=new_tokens, num_samples=group, temperature=0.0 if greedy else 1.0)
    t0 = time.perf_counter()
    out = generate(model, prompts, mask, rng=jax.random.PRNGKey(0), **kwargs)
    jax.block_until_ready(out.tokens)
    first = time.perf_counter() - t0
    if reps == 0:
        return out, {}
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        out = generate(model, prompts, mask, rng=jax.random.PRNGKey(i + 1), **kwargs)
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - t0)
    # time to first token: the same call with a budget of one token (compiled separately)
    generate(model, prompts, mask, rng=jax.random.PRNGKey(0), max_new_tokens=1, num_samples=group)
    t0 = time.perf_counter()
    jax.block_until_ready(generate(model, prompts, mask, rng=jax.random.PRNGKey(0), max_new_tokens=1, num_samples=group).tokens)
    ttft = time.perf_counter() - t0
    median = statistics.median(times)
    return out, {"compile_s": first - median, "ttft_s": ttft, "wall_s": median}


def time_hf(hf, prompts, mask, group, new_tokens, reps, greedy=False):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    att = torch.tensor(mask, dtype=torch.long)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=not greedy, num_return_sequences=group,
                  pad_token_id=0, eos_token_id=None, top_k=None, top_p=None, temperature=None if greedy else 1.0)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=att, **kwargs)  # warm-up
        if reps == 0:
            return out[:, prompts.shape[1]:].numpy(), {}
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = hf.generate(input_ids=ids, attention_mask=att, **kwargs)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=att, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
        ttft = time.perf_counter() - t0
    return out[:, prompts.shape[1]:].numpy(), {"ttft_s": ttft, "wall_s": statistics.median(times)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 layers, d=128, V=4096, T=32")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.vocab, args.new_tokens, args.reps = 2, 128, 4096, 32, 2

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.batch)
    prompts = rng.integers(1, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    mask = (np.arange(args.prompt_len)[None] >= (args.prompt_len - lengths)[:, None]).astype(np.int32)  # left-padded
    prompts = prompts * mask

    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args.layers, args.dim, args.vocab, args.seed)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model, _ = load_hf(path)

    # same model: greedy tokens agree
    check = min(args.check_tokens, args.new_tokens)
    ours_greedy, _ = time_ours(model, prompts, mask, 1, check, 0, greedy=True)
    hf_greedy, _ = time_hf(hf, prompts, mask, 1, check, 0, greedy=True)
    agree = float(np.mean(np.asarray(ours_greedy.tokens) == hf_greedy))

    _, ours = time_ours(model, prompts, mask, args.group, args.new_tokens, args.reps)
    _, theirs = time_hf(hf, prompts, mask, args.group, args.new_tokens, args.reps)
    tokens = args.batch * args.group * args.new_tokens
    row = {
        "bench": "rollout", "layers": args.layers, "dim": args.dim, "vocab": args.vocab, "batch": args.batch,
        "group": args.group, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
        "greedy_token_agreement": agree,
        "ours_tokens_per_s": tokens / ours["wall_s"], "hf_tokens_per_s": tokens / theirs["wall_s"],
        "ratio_tokens_per_s": theirs["wall_s"] / ours["wall_s"],
        "ours_compile_s": ours["compile_s"], "ours_ttft_s": ours["ttft_s"], "hf_ttft_s": theirs["ttft_s"],
        **run_metadata(args.quick, torch=torch.__version__),
    }
    emit("rollout", row, save=not args.no_save)


if __name__ == "__main__":
    main()
