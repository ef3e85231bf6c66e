"""Benchmark: chunked `logprobs_from_hidden` vs the naive path (full logits, then log-softmax).

For each (V, T) it reports, for the forward pass and for forward+backward
(`value_and_grad` w.r.t. hidden and unembed of a loss mixing logprobs and entropy):

    * compiled temporary memory (`compile().memory_analysis().temp_size_in_bytes`),
    * median wall time over `--reps` runs (after a warm-up run),
    * ratios naive/chunked for memory and chunked/naive for time,
    * the max abs difference between the two paths' outputs (a correctness sanity check).

One JSON object per line on stdout, also appended to benchmarks/results/logprobs.jsonl.
Sizes whose naive float32 logits exceed `--time-max-logits-gib` are compiled (memory
numbers) but not executed, so the big vocabularies stay usable on a small CPU machine.

Usage:
    python benchmarks/logprobs.py --quick
    python benchmarks/logprobs.py --sizes 32768:1024,151936:1024 --D 1024
    python benchmarks/logprobs.py               # V in {32768, 151936, 262144} x T in {1024, 4096}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxrl_llm.ops.logprobs import (  # noqa: E402
        entropy_from_logits,
        logprobs_from_hidden,
        token_logprobs,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "logprobs.jsonl"
DEFAULT_VOCABS = (32768, 151936, 262144)
DEFAULT_LENGTHS = (1024, 4096)


def naive(hidden, unembed, tokens):
    logits = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32)
    return token_logprobs(logits, tokens), entropy_from_logits(logits)


def make_chunked(chunk_size):
    return lambda hidden, unembed, tokens: logprobs_from_hidden(
        hidden, unembed, tokens, chunk_size=chunk_size
    )


def make_loss(fn):
    def loss(hidden, unembed, tokens):
        logp, ent = fn(hidden, unembed, tokens)
        return jnp.mean(logp) + 0.01 * jnp.mean(ent)

    return jax.value_and_grad(loss, argnums=(0, 1))


def compile_fn(fn, args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    return compiled, int(mem.temp_size_in_bytes) if mem is not None else None


def time_fn(compiled, args, reps, warmup):
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def max_abs_diff(a, b):
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    f32 = lambda x: x.astype(jnp.float32)
    return max(float(jnp.max(jnp.abs(f32(x) - f32(y)))) for x, y in leaves)


def bench_one(B, T, D, V, chunk_size, dtype, reps, warmup, time_max_logits_gib, seed=0):
    logits_bytes = B * T * V * 4
    execute = logits_bytes <= time_max_logits_gib * 2**30
    if execute:
        rng = np.random.default_rng(seed)
        args = (
            jnp.asarray(rng.normal(size=(B, T, D)), dtype),
            jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), dtype),
            jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
        )
    else:
        args = (
            jax.ShapeDtypeStruct((B, T, D), dtype),
            jax.ShapeDtypeStruct((D, V), dtype),
            jax.ShapeDtypeStruct((B, T), jnp.int32),
        )
    rows = []
    for mode, wrap in (("forward", lambda f: f), ("value_and_grad", make_loss)):
        row = dict(
            bench="logprobs_from_hidden",
            mode=mode,
            B=B,
            T=T,
            D=D,
            V=V,
            chunk_size=chunk_size,
            dtype=jnp.dtype(dtype).name,
            full_logits_f32_bytes=logits_bytes,
        )
        results = {}
        for name, fn in (("chunked", make_chunked(chunk_size)), ("naive", naive)):
            compiled, temp = compile_fn(wrap(fn), args)
            row[f"{name}_temp_bytes"] = temp
            if execute:
                ms, out = time_fn(compiled, args, reps, warmup)
                row[f"{name}_ms"] = round(ms, 3)
                results[name] = out
            del compiled
        if row["chunked_temp_bytes"] and row["naive_temp_bytes"] is not None:
            row["mem_ratio_naive_over_chunked"] = round(
                row["naive_temp_bytes"] / row["chunked_temp_bytes"], 2
            )
        if execute:
            row["time_ratio_chunked_over_naive"] = round(row["chunked_ms"] / row["naive_ms"], 3)
            row["max_abs_diff"] = max_abs_diff(results["chunked"], results["naive"])
        else:
            row["timed"] = False
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--D", type=int, default=1024)
    parser.add_argument("--V", type=int, nargs="+", default=list(DEFAULT_VOCABS))
    parser.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument(
        "--sizes", type=str, default=None,
        help="comma-separated V:T pairs (overrides --V/--T), e.g. 32768:1024,151936:4096",
    )
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--time-max-logits-gib", type=float, default=1.0,
        help="only execute (time) sizes whose float32 [B,T,V] logits are at most this many GiB",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small sizes: V in {4096, 8192}, T=512, D=128, chunk 64",
    )
    parser.add_argument("--no-save", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)

    if args.quick:
        pairs = [(4096, 512), (8192, 512)]
        args.D, args.chunk_size = 128, 64
    elif args.sizes:
        pairs = [tuple(int(x) for x in p.split(":")) for p in args.sizes.split(",")]
    else:
        pairs = [(v, t) for v in args.V for t in args.T]
    if args.chunk_size <= 0:
        parser.error("--chunk-size must be positive")

    meta = dict(
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host_cpus=os.cpu_count(),
    )
    dtype = jnp.dtype(args.dtype)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for V, T in pairs:
        rows = bench_one(
            args.B, T, args.D, V, args.chunk_size, dtype, args.reps, args.warmup,
            args.time_max_logits_gib,
        )
        for row in rows:
            row.update(meta)
            line = json.dumps(row)
            print(line, flush=True)
            if not args.no_save:
                with RESULTS.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
