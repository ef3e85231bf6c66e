"""Benchmark: sampling throughput of `jaxrl_llm.rollout.generate` vs transformers'
PyTorch `generate`, on the same random Llama-style checkpoint and the same prompts.

Both sample B prompts × G samples of exactly `--new-tokens` tokens (no stop token, so
every row decodes the full budget; top-k / top-p off, temperature 1). Ours prefills each
prompt once and broadcasts its KV cache to the G samples; HF is given the same via
`num_return_sequences=G`. Reported separately: compile time (first call minus a warm
call), time-to-first-token (prefill + first sample), and steady tokens/s = B·G·T / median
wall time of a warm call. The timed calls of all sides are interleaved round by round, and
the ratio `ratio_tokens_per_s` = ours / HF is measured in that one run.

Before timing, greedy tokens (first `--check-tokens`) are compared with ours and the
agreement stored: 1.0 in float32; in bf16 near-tied logits of a random model flip some
argmaxes between implementations.

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
  python benchmarks/rollout.py --tunix   # also Tunix's sampler (needs `pip install google-tunix`)

With `--tunix`, Tunix's `generate.Sampler` runs on its own Llama3 model loaded from the
same safetensors checkpoint. It has no notion of G samples per prompt, so it is given each
prompt G times (its prefill pays for every copy); its greedy tokens are checked against ours too.

`--model smollm2-135m-instruct` (or a local HF checkpoint folder) measures a real
pretrained model instead of the random one: both sides load that folder, and the prompts
are real questions (`CHAT_QUESTIONS`) rendered with the tokenizer's chat template,
left-padded to the longest (`--prompt-len` is then that length).

  python benchmarks/rollout.py --model smollm2-135m-instruct --batch 8 --group 4 \
      --new-tokens 64 --single-thread

On CPU each row adds a compute roofline measured in the same run: one-thread (with
`--single-thread`) FLOP/s of decode-shaped matmuls, rows = B·G, the model's [d, d_ff]
over its layers' distinct weights and [d, V] (`common.measure_gemm_roofline`, XLA and
PyTorch, the faster taken). The model FLOPs per generated token (projections, attention
over the average context, unembedding: `common.decoder_flops_per_token`) × tokens/s ÷
that rate is `<side>_roofline_frac`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.single_thread import pin_from_argv  # noqa: E402  (before jax / torch start)

pin_from_argv()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import (  # noqa: E402
    decoder_flops_per_token,
    device_peaks,
    emit,
    measure_gemm_roofline,
    resolve_model,
    roofline_fields,
    run_metadata,
    torch_device,
)
from jaxrl_llm.models import load_hf  # noqa: E402
from jaxrl_llm.rollout import generate  # noqa: E402

# Tunix 0.1.7's Llama3 attention calls apply_rope without the config's rope_theta, so it
# always uses its default 1e6; the checkpoint uses that base so all three sides compute
# the same function (the base does not change the cost).
TUNIX_ROPE_THETA = 1_000_000.0

# `--model`: B distinct user questions (the first B), each rendered with the chat template
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Give me three words that rhyme with cat.",
    "Why is the sky blue?",
    "What is 17 times 3?",
    "Name a famous painting by Leonardo da Vinci.",
    "How many legs does a spider have?",
    "Write a short greeting for a birthday card.",
    "What does a bee make?",
    "How do plants make their food?",
    "What is the largest planet in the solar system?",
    "Suggest a name for a pet goldfish.",
    "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "What colour do you get by mixing blue and yellow?",
    "List two fruits that are red.",
)


def make_checkpoint(path: str, layers: int, dim: int, vocab: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=int(dim * 2.75) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(dim // 64, 2),
                         num_key_value_heads=max(dim // 128, 1), max_position_embeddings=4096,
                         rope_theta=TUNIX_ROPE_THETA)
    LlamaForCausalLM(config).eval().save_pretrained(path)


def ours_sampler(model):
    """(prompts, mask, group, new_tokens, seed, greedy) → tokens [rows, new_tokens]."""

    def sample(prompts, mask, group, new_tokens, seed, greedy=False):
        out = generate(model, prompts, mask, rng=jax.random.PRNGKey(seed), max_new_tokens=new_tokens,
                       num_samples=group, temperature=0.0 if greedy else 1.0)
        return np.asarray(out.tokens)  # device → host: waits for the result

    return sample


def hf_sampler(hf):
    """transformers `generate`: num_return_sequences=G, exactly `new_tokens` tokens."""
    import torch

    device = next(hf.parameters()).device

    def sample(prompts, mask, group, new_tokens, seed, greedy=False):
        torch.manual_seed(seed)
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        att = torch.tensor(mask, dtype=torch.long, device=device)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=not greedy, num_return_sequences=group, pad_token_id=0, eos_token_id=None,
                              top_k=None, top_p=None, temperature=None if greedy else 1.0)
        return out[:, prompts.shape[1]:].cpu().numpy()  # .cpu() waits for the GPU

    return sample


def time_sides(samplers: dict, prompts, mask, group: int, new_tokens: int, reps: int) -> dict:
    """Per side: first-call time, median wall time of a full call, and median time to first
    token (a one-token call). Every call is compiled/warmed first; then the timed calls of
    all sides are interleaved round by round, so load from other processes hits them alike."""
    first = {}
    for name, sample in samplers.items():
        t0 = time.perf_counter()
        sample(prompts, mask, group, new_tokens, 0)
        first[name] = time.perf_counter() - t0
        sample(prompts, mask, group, 1, 0)
    walls, ttfts = ({name: [] for name in samplers} for _ in range(2))
    for i in range(reps):
        for name, sample in samplers.items():
            t0 = time.perf_counter()
            sample(prompts, mask, group, new_tokens, i + 1)
            walls[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sample(prompts, mask, group, 1, i + 1)
            ttfts[name].append(time.perf_counter() - t0)
    return {name: {"first_call_s": first[name], "wall_s": statistics.median(walls[name]),
                   "ttft_s": statistics.median(ttfts[name])} for name in samplers}


class _IdTokenizer:
    """The minimal tokenizer Tunix's sampler accepts: text is space-separated token ids,
    no BOS (falsy id), pad 0 (never a prompt token here)."""

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return 0

    def eos_id(self):
        return -1

    def pad_id(self):
        return 0


def load_tunix(path: str, dtype, max_len: int):
    """Tunix's Llama3 from the same checkpoint, wrapped in its sampler."""
    import json

    from tunix.generate import sampler as tunix_sampler
    from tunix.models.llama3 import model as llama3, params as llama3_params

    hf = json.loads((pathlib.Path(path) / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    config = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=head_dim,
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf.get("rope_theta", 10000.0)),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf.get("tie_word_embeddings", False))
    model = llama3_params.create_model_from_safe_tensors(path, config, dtype=dtype)
    cache = tunix_sampler.CacheConfig(cache_size=max_len, num_layers=config.num_layers,
                                      num_kv_heads=config.num_kv_heads, head_dim=head_dim)
    return tunix_sampler.Sampler(model, _IdTokenizer(), cache)


def tunix_sampler(sampler, vocab: int):
    """Tunix's sampler given every prompt `group` times; eos is an id outside the
    vocabulary, so every row decodes the full budget as on the other sides."""

    def sample(prompts, mask, group, new_tokens, seed, greedy=False):
        texts = [" ".join(str(t) for t in row[m > 0]) for row, m in zip(prompts, mask) for _ in range(group)]
        out = sampler(texts, seed=seed, max_generation_steps=new_tokens, max_prompt_length=prompts.shape[1],
                      eos_tokens=[vocab], temperature=1e-6 if greedy else 1.0, top_p=None if greedy else 1.0,
                      pad_output=True)
        return np.array([[int(t) for t in s.split()] for s in out.text])

    return sample


def decode_bytes(model, rows: int, prompt_len: int, new_tokens: int, cache_itemsize: int) -> float:
    """Bytes an ideal decoder reads over `new_tokens` − 1 decode steps: every weight once
    per step, plus the keys and values of each row's valid prefix (prompt + tokens so far)."""
    cfg = model.config
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_itemsize
    steps = np.arange(1, new_tokens)
    return float(np.sum(weights + rows * kv_per_token * (prompt_len + steps)))


def random_prompts(args, batch: int):
    """Left-padded random prompts of args.prompt_len // 2 … args.prompt_len tokens."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, batch)
    prompts = rng.integers(1, args.vocab, (batch, args.prompt_len)).astype(np.int32)
    mask = (np.arange(args.prompt_len)[None] >= (args.prompt_len - lengths)[:, None]).astype(np.int32)  # left-padded
    return prompts * mask, mask


def chat_prompts(tokenizer, batch: int):
    """The first ``batch`` CHAT_QUESTIONS as user messages through the chat template,
    left-padded (masked pad id) to the longest."""
    from jaxrl_llm.data.prompts import collate_prompts, tokenize_prompts
    from jaxrl_llm.data.tokenization import pad_id

    if batch > len(CHAT_QUESTIONS):
        raise ValueError(f"--batch {batch}: only {len(CHAT_QUESTIONS)} distinct chat questions")
    records = [{"prompt": [{"role": "user", "content": q}]} for q in CHAT_QUESTIONS[:batch]]
    items, _ = tokenize_prompts(records, tokenizer)
    out = collate_prompts(items, pad_token_id=pad_id(tokenizer), padding_side="left", bucket=1)
    return np.asarray(out.tokens, np.int32), np.asarray(out.mask, np.int32)


def bench_one(model, hf, args, batch: int, group: int, dtype, tunix=None, tokenizer=None) -> dict:
    """One (batch, group) row: ours vs HF (and Tunix) tokens/s, measured interleaved."""
    prompts, mask = chat_prompts(tokenizer, batch) if tokenizer is not None else random_prompts(args, batch)
    prompt_len = prompts.shape[1]

    samplers = {"ours": ours_sampler(model), "hf": hf_sampler(hf)}
    if tunix is not None:
        samplers["tunix"] = tunix_sampler(tunix, args.vocab)
    # same model: greedy tokens agree with ours
    check = min(args.check_tokens, args.new_tokens)
    greedy = {name: sample(prompts, mask, 1, check, 0, greedy=True) for name, sample in samplers.items()}
    timed = time_sides(samplers, prompts, mask, group, args.new_tokens, args.reps)
    ours, theirs = timed["ours"], timed["hf"]
    tokens = batch * group * args.new_tokens
    row = {
        "bench": "rollout", "model": args.model, "layers": args.layers, "dim": args.dim, "vocab": args.vocab,
        "batch": batch, "group": group, "prompt_len": prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
        "dtype": args.dtype, "greedy_token_agreement": float(np.mean(greedy["ours"] == greedy["hf"])),
        "ours_tokens_per_s": tokens / ours["wall_s"], "hf_tokens_per_s": tokens / theirs["wall_s"],
        "ratio_tokens_per_s": theirs["wall_s"] / ours["wall_s"],
        "ours_compile_s": ours["first_call_s"] - ours["wall_s"], "ours_ttft_s": ours["ttft_s"],
        "hf_ttft_s": theirs["ttft_s"],
    }
    if tunix is not None:
        row.update(tunix_greedy_token_agreement=float(np.mean(greedy["ours"] == greedy["tunix"])),
                   tunix_tokens_per_s=tokens / timed["tunix"]["wall_s"], tunix_ttft_s=timed["tunix"]["ttft_s"],
                   tunix_compile_s=timed["tunix"]["first_call_s"] - timed["tunix"]["wall_s"],
                   ratio_tokens_per_s_over_tunix=timed["tunix"]["wall_s"] / ours["wall_s"])
    if args.model is not None:
        row["mean_prompt_tokens"] = float(mask.sum(1).mean())
    peaks = device_peaks()
    if peaks is None and dtype == jnp.float32:  # CPU: against the measured one-thread GEMM ceiling
        flops = decoder_flops_per_token(model.config, context=prompt_len + args.new_tokens / 2)
        row.update(roofline_fields(measure_gemm_roofline(model.config, batch * group), flops),
                   flops_per_token=sum(flops.values()))
        for side in timed:
            achieved = row[f"{side}_tokens_per_s"] * row["flops_per_token"]
            row[f"{side}_flops_per_s"] = achieved
            row[f"{side}_roofline_frac"] = achieved / row["roofline_flops_per_s"]
    if peaks is not None:
        moved = decode_bytes(model, batch * group, prompt_len, args.new_tokens, jnp.dtype(dtype).itemsize)
        for side, t in timed.items():
            bandwidth = moved / max(t["wall_s"] - t["ttft_s"], 1e-9)
            row[f"{side}_decode_bytes_per_s"] = bandwidth
            row[f"{side}_decode_bandwidth_util"] = bandwidth / peaks["hbm_bytes_per_s"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a named model (smollm2-135m-instruct) or a local HF checkpoint folder instead of "
                             "the random Llama (--layers/--dim/--vocab then come from its config); chat prompts")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--group", type=int, nargs="+", default=[4])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations of every side")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 layers, d=128, V=4096, T=32")
    parser.add_argument("--single-thread", action="store_true",
                        help="CPU: one thread for XLA and PyTorch (a fair per-core ratio on a shared, loaded "
                             "machine, where OpenMP's spinning threads can stall PyTorch badly)")
    parser.add_argument("--tunix", action="store_true", help="also time Tunix's sampler (google-tunix)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.vocab, args.new_tokens, args.reps = 2, 128, 4096, 32, 2

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1 if args.single_thread else os.cpu_count() or 1)
    device = torch_device()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default f32 matmul precision on GPU
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    checkpoint, tokenizer = resolve_model(args.model), None

    def load(path, max_len):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
        model, _ = load_hf(path, dtype=dtype)
        tunix = load_tunix(path, dtype, max_len) if args.tunix else None
        return hf, model, tunix

    if checkpoint is None:
        with tempfile.TemporaryDirectory() as path:
            make_checkpoint(path, args.layers, args.dim, args.vocab, args.seed)
            hf, model, tunix = load(path, args.prompt_len + args.new_tokens)
    else:
        from jaxrl_llm.models import load_tokenizer

        tokenizer = load_tokenizer(checkpoint)
        longest = max(chat_prompts(tokenizer, b)[0].shape[1] for b in args.batch)
        hf, model, tunix = load(checkpoint, longest + args.new_tokens)
        args.layers, args.dim, args.vocab = model.config.num_layers, model.config.hidden_size, model.config.vocab_size

    versions = {"torch": torch.__version__, "torch_device": device, "single_thread": args.single_thread}
    if args.tunix:
        from importlib.metadata import version

        versions["tunix"] = version("google-tunix")
    meta = run_metadata(args.quick, **versions)
    for batch in args.batch:
        for group in args.group:
            row = bench_one(model, hf, args, batch, group, dtype, tunix, tokenizer)
            emit("rollout", {**row, **meta}, save=not args.no_save)


if __name__ == "__main__":
    main()
