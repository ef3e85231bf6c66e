"""Benchmark: compile time vs depth, unrolled decoder vs `scan_layers=True` (decoder
weights stored stacked, [L, ...] leaves, one `lax.scan`).

For each depth (default 8, 16, 32 layers of a small random Llama, d = 256) and each
decoder form, four programs are traced, lowered and compiled once, then timed:

  * forward:      `CausalLM.forward` logits of a [rows, prompt + response] batch;
  * update:       one GRPO policy update, the trainer's own `grpo._make_update` as
                  `train_step.py` builds it (chunked log-probs, value_and_grad, clip by
                  global norm, AdamW from `make_optimizer`), on one device;
  * decode_step:  one decode step ([rows, 1] token into a KV cache of prompt + response
                  slots) as its own jitted call;
  * generate:     prefill + `--len` greedy decode steps in one jitted `fori_loop`, the
                  shape of the rollout's decode loop.

Per program and form: `lower_s` = trace + lower (`jax.jit(f).trace(...).lower()`, the
Python side, which the Python layer loop makes grow with depth), `compile_s` =
`lowered.compile()` (XLA), both wall clock and process CPU time (`*_cpu_s`, all threads;
on a shared box other jobs inflate wall time, not CPU time), XLA's memory analysis of
the compiled program (`*_temp_bytes`, `*_total_bytes` = arguments + outputs − aliased +
temporaries), the number of fused kernels in the compiled program and of distinct ones
(`*_distinct_kernels`: XLA generates code once per distinct kernel, which is where CPU
compile time goes) and the median run time of `--reps` calls (interleaved unrolled /
scanned round by round). `--compile-reps N` compiles each program N times and keeps the
fastest.

Rows (appended to results/compile_time.jsonl): one per depth with both forms side by
side and `ratio_scanned_over_unrolled_<program>_<field>`, then a summary row
(`depth: "summary"`) with `ratio_<form>_<program>_{compile,compile_wall,lower}_<deepest>_over_<shallowest>`
(compile CPU time, compile wall time, trace + lower CPU time) — the issue's target is the
update's 32/8 compile ratio ≤ 1.3 with scan.

Usage:
  python benchmarks/compile_time.py --quick
  python benchmarks/compile_time.py                       # depths 8 16 32, d = 256
  python benchmarks/compile_time.py --depths 8 32 --programs update --compile-reps 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, run_metadata  # noqa: E402
from jaxrl_llm.models.config import tiny_config  # noqa: E402
from jaxrl_llm.models.transformer import CausalLM, layer_runs  # noqa: E402

FORMS = ("unrolled", "scanned")
PROGRAMS = ("forward", "update", "decode_step", "generate")


def make_config(args, depth):
    return tiny_config("llama", num_layers=depth, hidden_size=args.dim, intermediate_size=2 * args.dim,
                       num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.dim // args.heads,
                       vocab_size=args.vocab, tie_word_embeddings=False)


def make_batch(args):
    rng = np.random.default_rng(0)
    rows, p, t = args.rows, args.prompt_len, args.len
    tokens = rng.integers(1, args.vocab, (rows, p + t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, rows)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    full_mask = np.concatenate([np.ones((rows, p), np.float32), mask], 1).astype(np.int32)
    adv = rng.normal(size=rows).astype(np.float32)
    old = -np.abs(rng.normal(size=(rows, t))).astype(np.float32) - 5.0
    return {"tokens": jnp.asarray(tokens), "full_mask": jnp.asarray(full_mask), "mask": jnp.asarray(mask),
            "advantages": jnp.asarray(adv), "tis_weight": jnp.ones((rows, t), jnp.float32),
            "old_logp": jnp.asarray(old), "ref_logp": jnp.asarray(old + 0.05), "routing": None}


def timed_compile(fn, args, reps, context=None):
    """(lowered-and-compiled executable, timings) of jax.jit'ed `fn` on `args`: the
    fastest of `reps` trace + lower + compile rounds (wall and process CPU seconds)."""
    import contextlib

    best = None
    for _ in range(reps):
        jax.clear_caches()  # or a later round returns the first one's cached trace/executable
        with context() if context is not None else contextlib.nullcontext():
            w0, c0 = time.perf_counter(), time.process_time()
            lowered = fn.trace(*args).lower()
            w1, c1 = time.perf_counter(), time.process_time()
            compiled = lowered.compile()
            w2, c2 = time.perf_counter(), time.process_time()
        t = {"lower_s": w1 - w0, "lower_cpu_s": c1 - c0, "compile_s": w2 - w1, "compile_cpu_s": c2 - c1}
        if best is None or t["compile_cpu_s"] < best[1]["compile_cpu_s"]:
            best = (compiled, t)
    return best


def memory_fields(compiled) -> dict:
    """XLA's memory analysis, and the compiled program's fused kernels: all, and distinct
    up to names (XLA compiles each distinct kernel once, so this is what codegen scales
    with)."""
    fields = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        fields = {"temp_bytes": int(mem.temp_size_in_bytes),
                  "total_bytes": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes - mem.alias_size_in_bytes)}
    bodies = []
    for block in compiled.as_text().split("\n\n"):
        head, _, body = block.strip().partition("\n")
        if re.match(r"%?fused_computation", head):
            body = re.sub(r", metadata=\{[^}]*\}", "", body)
            bodies.append(re.sub(r"%[\w.\-]+", "%", body))
    fields.update(kernels=len(bodies), distinct_kernels=len(set(bodies)))
    return fields


def build_programs(args, depth, scan, batch):
    """{program: (compiled, timings, memory, run_fn)} for one depth and decoder form."""
    from jaxrl_llm.parallel.placement import MeshConfig, Placement
    from jaxrl_llm.train.grpo import GRPOConfig, _make_update, _Static
    from jaxrl_llm.train.optim import OptimConfig, make_optimizer
    from jaxrl_llm.train.policy import split_model

    cfg = make_config(args, depth)
    model = CausalLM(cfg, rngs=nnx.Rngs(0), scan_layers=scan)
    out = {}
    graphdef, state = nnx.split(model)
    tokens, full_mask = batch["tokens"], batch["full_mask"]

    if "forward" in args.programs:
        fwd = jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state).forward(tokens, attention_mask=mask).logits)
        compiled, t = timed_compile(fwd, (state, tokens, full_mask), args.compile_reps)
        out["forward"] = (compiled, t, memory_fields(compiled),
                          lambda c=compiled: jax.block_until_ready(c(state, tokens, full_mask)))

    p = args.prompt_len
    if "decode_step" in args.programs:
        cache = model.init_cache(args.rows, p + args.len)
        _, cache = jax.jit(lambda s, t, m, c: nnx.merge(graphdef, s)(t, cache=c, attention_mask=m))(
            state, tokens[:, :p], full_mask[:, :p], cache)
        step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c))
        token = tokens[:, p : p + 1]
        compiled, t = timed_compile(step, (state, token, cache), args.compile_reps)
        out["decode_step"] = (compiled, t, memory_fields(compiled),
                              lambda c=compiled: jax.block_until_ready(c(state, token, cache)))

    if "generate" in args.programs:
        def generate(state, prompt):
            """Prefill + `len` greedy decode steps in one fori_loop (the rollout's shape)."""
            model = nnx.merge(graphdef, state)
            logits, cache = model(prompt, cache=model.init_cache(args.rows, p + args.len))
            token = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)

            def step(_, carry):
                cache, token = carry
                logits, cache = model(token, cache=cache)
                return cache, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)

            return jax.lax.fori_loop(0, args.len, step, (cache, token))[1]

        prompt = tokens[:, :p]
        compiled, t = timed_compile(jax.jit(generate), (state, prompt), args.compile_reps)
        out["generate"] = (compiled, t, memory_fields(compiled),
                           lambda c=compiled: jax.block_until_ready(c(state, prompt)))

    if "update" in args.programs:
        config = GRPOConfig(max_new_tokens=args.len, kl_coef=0.04, clip_low=0.2, clip_high=0.2,
                            loss_agg="seq_mean_token_mean", optim=OptimConfig(learning_rate=1e-5),
                            logprob_chunk_size=args.logprob_chunk)
        placement = Placement.create(MeshConfig(1, 1, 1, num_devices=1), model_config=cfg)
        split = split_model(model)
        tx = make_optimizer(config.optim, 100)
        update = _make_update(split, tx, _Static(args.prompt_len, config, True, True, False, True), placement)
        params = {"p": split.params, "o": tx.init(split.params)}
        compiled, t = timed_compile(update, (params["p"], params["o"], batch, True), args.compile_reps,
                                    context=placement.context)

        def run(compiled=compiled, params=params):
            p_new, o_new, _, metrics = compiled(params["p"], params["o"], batch, True)
            jax.block_until_ready(p_new)
            params.update(p=p_new, o=o_new)
            return metrics

        out["update"] = (compiled, t, memory_fields(compiled), run)
    return out, layer_runs(model.model) if scan else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--len", type=int, default=48, help="response length T")
    parser.add_argument("--logprob-chunk", type=int, default=256)
    parser.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    parser.add_argument("--reps", type=int, default=3, help="timed runs per program (median)")
    parser.add_argument("--compile-reps", type=int, default=1, help="compiles per program (fastest kept)")
    parser.add_argument("--quick", action="store_true", help="depths 2 4, d = 64, V = 512, 2 rows × (8 + 8)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one
    if args.quick:
        args.depths, args.dim, args.vocab, args.rows, args.prompt_len, args.len, args.reps = [2, 4], 64, 512, 2, 8, 8, 2
    batch = make_batch(args)
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

    common = {"bench": "compile_time", "dim": args.dim, "heads": args.heads, "kv_heads": args.kv_heads,
              "vocab": args.vocab, "rows": args.rows, "prompt_len": args.prompt_len, "response_len": args.len,
              "programs": "+".join(args.programs), "compile_reps": args.compile_reps, "reps": args.reps,
              # rows before this field: weights stacked per call from per-layer storage
              "scan_layout": "stored_stacked"}
    per_depth = {}
    for depth in args.depths:
        row = {**common, "depth": depth}
        runs = {}
        for form in FORMS:
            programs, scan_runs = build_programs(args, depth, form == "scanned", batch)
            if scan_runs is not None:
                row["scanned_runs"] = [list(r) for r in scan_runs]
            for name, (compiled, t, mem, run) in programs.items():
                for key, value in {**t, **mem}.items():
                    row[f"{form}_{name}_{key}"] = value
                run()  # warm-up (first call)
                runs[f"{form}_{name}"] = run
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved, one call of every program per round
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            row[f"{name}_run_s"] = statistics.median(ts)
        for name in args.programs:
            for key in ("compile_cpu_s", "compile_s", "lower_s", "run_s", "total_bytes", "distinct_kernels"):
                un, sc = row.get(f"unrolled_{name}_{key}"), row.get(f"scanned_{name}_{key}")
                if un and sc is not None:
                    row[f"ratio_scanned_over_unrolled_{name}_{key}"] = sc / un
        row.update(run_metadata(args.quick))
        emit("compile_time", row, save=not args.no_save)
        per_depth[depth] = row

    lo, hi = min(args.depths), max(args.depths)
    summary = {**common, "depth": "summary", "shallowest": lo, "deepest": hi, "load_avg_at_start": load_start}
    for form in FORMS:
        for name in args.programs:
            for key, label in (("compile_cpu_s", "compile"), ("compile_s", "compile_wall"),
                               ("lower_cpu_s", "lower")):
                a, b = per_depth[lo].get(f"{form}_{name}_{key}"), per_depth[hi].get(f"{form}_{name}_{key}")
                if a and b is not None:
                    summary[f"ratio_{form}_{name}_{label}_{hi}_over_{lo}"] = b / a
    summary.update(run_metadata(args.quick))
    emit("compile_time", summary, save=not args.no_save)
    return per_depth, summary


if __name__ == "__main__":
    main()
