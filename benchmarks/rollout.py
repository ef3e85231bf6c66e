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

Several `--batch` / `--group` values give one row per (batch, group) pair: the scaling
sweeps. With shared prefill, G should cost less than the same number of extra prompts.

On a GPU both sides run on it (PyTorch with TF32 matmuls, as XLA uses by default), and
each row adds the decode phase's memory-bandwidth utilisation: the bytes an ideal decoder
must read per step (all weights once + the valid KV prefix of every row) over the decode
time (wall − time to first token), against the device's peak HBM bandwidth.

Usage:
  python benchmarks/rollout.py --quick                 # 2 layers, d=128, V=4096, T=32
  python benchmarks/rollout.py                         # 8 layers, d=512, V=32000, T=256
  python benchmarks/rollout.py --batch 1 4 16 --group 4      # batch sweep
  python benchmarks/rollout.py --batch 4 --group 1 4 16      # group sweep
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import device_peaks, emit, run_metadata, torch_device  # noqa: E402
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

    device = next(hf.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    att = torch.tensor(mask, dtype=torch.long, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=not greedy, num_return_sequences=group,
                  pad_token_id=0, eos_token_id=None, top_k=None, top_p=None, temperature=None if greedy else 1.0)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=att, **kwargs).cpu()  # warm-up
        if reps == 0:
            return out[:, prompts.shape[1]:].numpy(), {}
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = hf.generate(input_ids=ids, attention_mask=att, **kwargs).cpu()  # .cpu() waits for the GPU
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=att, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}).cpu()
        ttft = time.perf_counter() - t0
    return out[:, prompts.shape[1]:].numpy(), {"ttft_s": ttft, "wall_s": statistics.median(times)}


def decode_bytes(model, rows: int, prompt_len: int, new_tokens: int, cache_itemsize: int) -> float:
    """Bytes an ideal decoder reads over `new_tokens` − 1 decode steps: every weight once
    per step, plus the keys and values of each row's valid prefix (prompt + tokens so far)."""
    cfg = model.config
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_itemsize
    steps = np.arange(1, new_tokens)
    return float(np.sum(weights + rows * kv_per_token * (prompt_len + steps)))


def bench_one(model, hf, args, batch: int, group: int, dtype) -> dict:
    """One (batch, group) row: ours vs HF tokens/s, measured back to back."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, batch)
    prompts = rng.integers(1, args.vocab, (batch, args.prompt_len)).astype(np.int32)
    mask = (np.arange(args.prompt_len)[None] >= (args.prompt_len - lengths)[:, None]).astype(np.int32)  # left-padded
    prompts = prompts * mask

    # same model: greedy tokens agree
    check = min(args.check_tokens, args.new_tokens)
    ours_greedy, _ = time_ours(model, prompts, mask, 1, check, 0, greedy=True)
    hf_greedy, _ = time_hf(hf, prompts, mask, 1, check, 0, greedy=True)
    agree = float(np.mean(np.asarray(ours_greedy.tokens) == hf_greedy))

    _, ours = time_ours(model, prompts, mask, group, args.new_tokens, args.reps)
    _, theirs = time_hf(hf, prompts, mask, group, args.new_tokens, args.reps)
    tokens = batch * group * args.new_tokens
    row = {
        "bench": "rollout", "layers": args.layers, "dim": args.dim, "vocab": args.vocab, "batch": batch,
        "group": group, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
        "dtype": args.dtype, "greedy_token_agreement": agree,
        "ours_tokens_per_s": tokens / ours["wall_s"], "hf_tokens_per_s": tokens / theirs["wall_s"],
        "ratio_tokens_per_s": theirs["wall_s"] / ours["wall_s"],
        "ours_compile_s": ours["compile_s"], "ours_ttft_s": ours["ttft_s"], "hf_ttft_s": theirs["ttft_s"],
    }
    peaks = device_peaks()
    if peaks is not None:
        moved = decode_bytes(model, batch * group, args.prompt_len, args.new_tokens, jnp.dtype(dtype).itemsize)
        for side, t in (("ours", ours), ("hf", theirs)):
            bandwidth = moved / max(t["wall_s"] - t["ttft_s"], 1e-9)
            row[f"{side}_decode_bytes_per_s"] = bandwidth
            row[f"{side}_decode_bandwidth_util"] = bandwidth / peaks["hbm_bytes_per_s"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--group", type=int, nargs="+", default=[4])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations of both sides")
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
    device = torch_device()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default f32 matmul precision on GPU
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args.layers, args.dim, args.vocab, args.seed)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
        model, _ = load_hf(path, dtype=dtype)

    meta = run_metadata(args.quick, torch=torch.__version__, torch_device=device)
    for batch in args.batch:
        for group in args.group:
            emit("rollout", {**bench_one(model, hf, args, batch, group, dtype), **meta}, save=not args.no_save)


if __name__ == "__main__":
    main()
