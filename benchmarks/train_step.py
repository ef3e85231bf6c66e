"""Benchmark: one GRPO policy update (forward + backward + AdamW) on the same model and
batch — ours (jitted, chunked log-probs) vs a faithful eager PyTorch implementation of
the same loss on the transformers model — plus ours with remat on/off and bf16 vs fp32.

The loss (both sides): per-token ratio ρ = exp(logp − old_logp), clipped surrogate
max(−A·ρ, −A·clip(ρ, 0.8, 1.2)), seq_mean_token_mean aggregation, k3 KL to a reference
(β = 0.04). Both sides start from the same weights and batch; the first-step losses are
checked equal before timing. tokens/s = valid response tokens per update / median time.

On a GPU both sides run on it (PyTorch with TF32 matmuls, as XLA uses by default, plus a
bf16-autocast PyTorch variant beside our bf16), and each variant's model FLOPs
utilisation is reported: model FLOPs per update (6·N per token processed, N without the
input embedding but with the unembedding, tied or not, plus PaLM's causal-attention term
6·layers·d·L per token; remat recompute not counted) per second, over the device's dense
peak (TF32 peak for fp32 variants, bf16 peak for bf16 ones). On a CPU the same model FLOPs
are divided by a ceiling measured in the same run instead: one-thread (with
`--single-thread`) FLOP/s of matmuls of the update's shapes, rows = rows × (prompt +
response) tokens, the model's [d, d_ff] over its layers' distinct weights and [d, V]
(`common.measure_gemm_roofline`, XLA and PyTorch, the faster taken) →
`<variant>_roofline_frac` (fp32 variants; the forward's shapes stand for the backward's).

Memory: our compiled update's temporary bytes (activations etc.) and total bytes from XLA's
memory analysis, per variant (remat and bf16 shrink the temporaries), beside
`parallel.estimate_memory`'s total for the same model, batch, optimizer, remat and
log-prob chunk on one device (`ours_<variant>_estimate_bytes`,
`ratio_estimate_over_compiled_<variant>`); on a GPU also PyTorch's peak allocated bytes.

`--model smollm2-135m-instruct` (or a local HF checkpoint folder) runs the update on a real
pretrained model (both sides load that folder; `--layers/--dim/--vocab/--heads/--kv-heads`
are then its config's); the batch is still random tokens. `--variants` picks which of ours
to compile (each holds its own params and AdamW state).

Usage:
  python benchmarks/train_step.py --quick
  python benchmarks/train_step.py --layers 4 --dim 256 --vocab 8192 --rows 16 --len 256
  python benchmarks/train_step.py --model smollm2-135m-instruct --rows 8 --prompt-len 32 --len 32 \
      --variants fp32 fp32_remat --single-thread
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.single_thread import pin_from_argv  # noqa: E402  (before jax / torch start)

pin_from_argv()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    decoder_flops_per_token,
    device_peaks,
    emit,
    measure_gemm_roofline,
    resolve_model,
    roofline_fields,
    run_metadata,
    time_interleaved,
    torch_device,
)
from jaxrl_llm.models import load_hf  # noqa: E402
from jaxrl_llm.parallel.memory import estimate_memory  # noqa: E402
from jaxrl_llm.parallel.placement import MeshConfig, Placement  # noqa: E402
from jaxrl_llm.train.grpo import GRPOConfig, _make_update, _Static  # noqa: E402
from jaxrl_llm.train.optim import OptimConfig, make_optimizer  # noqa: E402
from jaxrl_llm.train.policy import split_model  # noqa: E402

BETA, CLIP, LR = 0.04, 0.2, 1e-5


def make_batch(rng, rows, prompt_len, resp_len, vocab):
    tokens = rng.integers(1, vocab, (rows, prompt_len + resp_len)).astype(np.int32)
    lengths = rng.integers(resp_len // 2, resp_len + 1, rows)
    mask = (np.arange(resp_len)[None] < lengths[:, None]).astype(np.float32)
    full_mask = np.concatenate([np.ones((rows, prompt_len), np.float32), mask], 1).astype(np.int32)
    return tokens, full_mask, mask, rng.normal(size=rows).astype(np.float32)


VARIANTS = ("fp32", "fp32_remat", "bf16")


def model_flops_by_shape(cfg, rows: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one forward + backward over rows × seq_len tokens (PaLM, App. B:
    3 × the forward, causal attention over L/2 keys on average), by matmul shape."""
    per_token = decoder_flops_per_token(cfg, context=seq_len / 2)
    return {shape: 3.0 * rows * seq_len * f for shape, f in per_token.items()}


def torch_step_fn(hf, prompt_len, autocast_bf16=False):
    import contextlib

    import torch

    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0, eps=1e-8)

    def logprobs(tokens, full_mask):
        cast = torch.autocast(tokens.device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        with cast:
            logits = hf(input_ids=tokens, attention_mask=full_mask).logits[:, prompt_len - 1 : -1].float()
        return torch.gather(torch.log_softmax(logits, -1), 2, tokens[:, prompt_len:, None])[..., 0]

    def step(tokens, full_mask, mask, adv, old, ref):
        logp = logprobs(tokens, full_mask)
        ratio = torch.exp(torch.clamp(logp - old, -20, 20))
        a = adv[:, None]
        per_tok = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
        kl = torch.clamp(torch.exp(ref - logp) - (ref - logp) - 1, -10, 10)
        per_tok = per_tok + BETA * kl
        loss = ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return loss.item()

    return logprobs, step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a named model (smollm2-135m-instruct) or a local HF checkpoint folder instead of "
                             "the random Llama")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which of our variants to compile and time (fp32 is always included)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--len", type=int, default=224, help="response length T")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--logprob-chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers, d=64, V=1024, 8 rows × (16 + 48)")
    parser.add_argument("--single-thread", action="store_true", help="CPU: one thread for XLA and PyTorch")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.vocab, args.rows, args.prompt_len, args.len, args.reps = 2, 64, 1024, 8, 16, 48, 2

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1 if args.single_thread else os.cpu_count() or 1)
    device = torch_device()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default f32 matmul precision on GPU
    names = ["fp32"] + [v for v in VARIANTS if v in args.variants and v != "fp32"]
    options = {"fp32": {}, "fp32_remat": {"remat": True}, "bf16": {"compute_dtype": jnp.bfloat16}}

    def load(path):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
        return hf, {name: load_hf(path, dtype=jnp.float32, **options[name])[0] for name in names}

    checkpoint = resolve_model(args.model)
    if checkpoint is None:
        with tempfile.TemporaryDirectory() as path:
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.dim * 2,
                              num_hidden_layers=args.layers, num_attention_heads=args.heads,
                              num_key_value_heads=args.kv_heads)
            LlamaForCausalLM(cfg).save_pretrained(path)
            hf, variants = load(path)
    else:
        hf, variants = load(checkpoint)
    cfg = variants["fp32"].config
    args.layers, args.dim, args.vocab = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    args.heads, args.kv_heads = cfg.num_heads, cfg.num_kv_heads
    rng = np.random.default_rng(0)
    tokens, full_mask, mask, adv = make_batch(rng, args.rows, args.prompt_len, args.len, args.vocab)

    # old / reference log-probs: the current policy's (ratio 1 at the first step), reference perturbed
    t_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
    t_full = torch.tensor(full_mask, dtype=torch.long, device=device)
    t_logprobs, t_step = torch_step_fn(hf, args.prompt_len)
    with torch.no_grad():
        old = t_logprobs(t_tokens, t_full)
    ref = old + 0.05
    torch_batch = (t_tokens, t_full, torch.tensor(mask, device=device), torch.tensor(adv, device=device), old, ref)
    valid_tokens = float(mask.sum())

    row = {"bench": "train_step", "model": args.model, "layers": args.layers, "dim": args.dim, "vocab": args.vocab,
           "rows": args.rows, "prompt_len": args.prompt_len, "response_len": args.len, "valid_tokens": valid_tokens,
           "reps": args.reps}
    batch = {"tokens": jnp.asarray(tokens), "full_mask": jnp.asarray(full_mask), "mask": jnp.asarray(mask),
             "advantages": jnp.asarray(adv), "tis_weight": jnp.ones_like(jnp.asarray(mask)),
             "old_logp": jnp.asarray(old.cpu().numpy()), "ref_logp": jnp.asarray(ref.cpu().numpy()), "routing": None}
    config = GRPOConfig(max_new_tokens=args.len, kl_coef=BETA, clip_low=CLIP, clip_high=CLIP,
                        loss_agg="seq_mean_token_mean", optim=OptimConfig(learning_rate=LR),
                        logprob_chunk_size=args.logprob_chunk)
    placement = Placement.create(MeshConfig(1, 1, 1, num_devices=1), model_config=cfg)  # one device, as timed
    steps = {}  # variant → one timed update (blocking)
    ours_loss = None
    for name, model in variants.items():
        split = split_model(model)
        tx = make_optimizer(config.optim, 100)
        update = _make_update(split, tx, _Static(args.prompt_len, config, True, True, False, True), placement)
        state = {"p": split.params, "o": tx.init(split.params)}
        t0 = time.perf_counter()
        with placement.context():
            compiled = update.lower(state["p"], state["o"], batch, True).compile()  # once: timed and analysed

        def run(compiled=compiled, state=state):
            p, o, _, m = compiled(state["p"], state["o"], batch, True)
            jax.block_until_ready(p)
            state.update(p=p, o=o)
            return m

        m = run()
        row[f"ours_{name}_compile_s"] = time.perf_counter() - t0
        # XLA's plan for the compiled update: activations and other temporaries (what
        # remat and bf16 shrink), and the total with arguments and outputs
        mem = compiled.memory_analysis()
        if mem is not None:
            row[f"ours_{name}_temp_bytes"] = int(mem.temp_size_in_bytes)
            row[f"ours_{name}_total_bytes"] = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes)
            # the estimator's prediction of that footprint (one device; the update is jitted
            # without donation)
            est = estimate_memory(cfg, (1, 1, 1), batch=args.rows, seq_len=args.prompt_len + args.len,
                                  param_dtype=jnp.float32, dtype=options[name].get("compute_dtype", jnp.float32),
                                  optimizer=tx, remat=name.endswith("remat"),
                                  logits_chunk_size=args.logprob_chunk, donate=False)
            row[f"ours_{name}_estimate_bytes"] = est["total"]
            row[f"ratio_estimate_over_compiled_{name}"] = est["total"] / row[f"ours_{name}_total_bytes"]
        if name == "fp32":
            ours_loss = float(m["loss"])
        steps[f"ours_{name}"] = run

    torch_loss = t_step(*torch_batch)
    row["first_loss_ours"], row["first_loss_torch"] = ours_loss, torch_loss
    assert abs(ours_loss - torch_loss) < 1e-3 * max(1.0, abs(torch_loss)), (ours_loss, torch_loss)
    steps["torch_fp32"] = lambda: t_step(*torch_batch)
    if device == "cuda":  # eager bf16 autocast: the PyTorch counterpart of our bf16 compute
        _, t_step_bf16 = torch_step_fn(hf, args.prompt_len, autocast_bf16=True)
        t_step_bf16(*torch_batch)  # warm-up
        steps["torch_bf16"] = lambda: t_step_bf16(*torch_batch)
    for name, seconds in time_interleaved(steps, args.reps).items():
        row[f"{name}_tokens_per_s"] = valid_tokens / seconds
    row["ratio_ours_fp32_over_torch"] = row["ours_fp32_tokens_per_s"] / row["torch_fp32_tokens_per_s"]
    if "torch_bf16" in steps:
        row["ratio_ours_bf16_over_torch_bf16"] = row["ours_bf16_tokens_per_s"] / row["torch_bf16_tokens_per_s"]
    peaks = device_peaks()
    flops = model_flops_by_shape(cfg, args.rows, args.prompt_len + args.len)
    flops_per_valid_token = sum(flops.values()) / valid_tokens
    row["flops_per_valid_token"] = flops_per_valid_token
    if peaks is not None:
        for key in [k for k in row if k.endswith("_tokens_per_s")]:
            peak = peaks["bf16_flops"] if "bf16" in key else peaks["tf32_flops"]
            row[key.replace("_tokens_per_s", "_mfu")] = row[key] * flops_per_valid_token / peak
    elif device == "cpu":  # against the matmul ceiling measured now, at the update's shapes
        row.update(roofline_fields(measure_gemm_roofline(cfg, args.rows * (args.prompt_len + args.len)), flops))
        for key in [k for k in row if k.endswith("_tokens_per_s") and "bf16" not in k]:
            row[key.replace("_tokens_per_s", "_roofline_frac")] = (
                row[key] * flops_per_valid_token / row["roofline_flops_per_s"])
    if device == "cuda":  # PyTorch's peak over all its steps above (model, AdamW state, activations)
        row["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    row.update(run_metadata(args.quick, torch=torch.__version__, torch_device=device,
                            single_thread=args.single_thread))
    emit("train_step", row, save=not args.no_save)


if __name__ == "__main__":
    main()
