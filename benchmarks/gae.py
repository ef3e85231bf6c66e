"""Benchmark: the two algorithms of `jaxrl_llm.ops.gae` (reverse `lax.scan` and
`lax.associative_scan`) against a numpy loop and rlax. `ops.gae(method="auto")` picks
the scan on CPU and the associative scan on accelerators, from these measurements.

Variants, all on the same [B, T] float32 rewards/values/mask:
  * ``scan``       — `ops.gae(method="scan")`, jitted (the ratios' denominator).
  * ``assoc``      — `ops.gae(method="associative")`: `jax.lax.associative_scan` over the affine maps x ↦ a_t·x + b_t of
                     A_t = δ_t + γλ·A_{t+1}: O(log T) depth instead of T sequential steps.
                     Masking uses per-step coefficients: a valid token has (a, b) = (γλ, δ_t),
                     a masked one (1, 0), so the recursion is carried across it; the
                     next-valid value in δ_t comes from a second associative scan
                     (valid: (0, V_t), masked: (1, 0)).
  * ``numpy``      — a backward numpy loop over t, vectorised over B (the plain reference).
  * ``rlax``       — `jax.vmap(rlax.truncated_generalized_advantage_estimation)`, jitted.
                     rlax has no mask: it is timed on the same arrays and ignores the mask,
                     which does the same amount of work per token.

The timed inputs have a ragged right-padded mask with holes (a multi-turn layout). Before
timing, every variant is checked against ``scan`` (max abs difference asserted below a
tolerance): scan/assoc/numpy on the masked inputs, and all four on a full mask.

Timing: compile once (warm-up call), then the median of ``--reps`` calls, each ended by
`block_until_ready`; the calls of the four variants are interleaved round by round so that
load from other processes hits them alike. One JSON object per line on stdout, also appended to
benchmarks/results/gae.jsonl. Ratios (variant time / scan time) come from one run.

Usage:
  python benchmarks/gae.py --quick          # B=64, T in {64, 256}
  python benchmarks/gae.py                  # B=256, T in {128, 512, 2048, 8192}
  python benchmarks/gae.py --B 256 --T 1024 4096 --reps 9
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
try:  # rlax is a dev dependency; an accelerator image may lack it
    import rlax
except ImportError:
    rlax = None

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import time_interleaved  # noqa: E402
from jaxrl_llm.ops import gae  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "gae.jsonl"
DEFAULT_LENGTHS = (128, 512, 2048, 8192)
VARIANTS = ("scan", "assoc", "numpy") + (("rlax",) if rlax is not None else ())


def gae_numpy(rewards, values, mask, gamma, lam):
    """Backward loop over t, vectorised over the batch, from the definition."""
    B, T = rewards.shape
    adv = np.zeros((B, T), np.float32)
    next_value = np.zeros(B, np.float32)
    next_adv = np.zeros(B, np.float32)
    for t in range(T - 1, -1, -1):
        valid = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = np.where(valid, a, 0.0)
        next_value = np.where(valid, values[:, t], next_value)
        next_adv = np.where(valid, a, next_adv)
    return adv, np.where(mask > 0, adv + values, 0.0)


def gae_rlax(rewards, values, mask, gamma, lam):
    """rlax on every token (no mask support); value after the last token is 0."""
    del mask
    bootstrap = jnp.concatenate([values, jnp.zeros_like(values[:, :1])], axis=1)
    discount = jnp.full_like(rewards, gamma)
    adv = jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(0, 0, None, 0))(
        rewards, discount, lam, bootstrap
    )
    return adv, adv + values


def make_inputs(B, T, seed, holes=True):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    lengths = rng.integers(T // 2, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    if holes:  # a masked span (e.g. a tool output) inside every other response
        start = rng.integers(0, T // 4, size=B)
        span = (np.arange(T)[None, :] >= start[:, None]) & (np.arange(T)[None, :] < start[:, None] + T // 8)
        mask = np.where(span & (np.arange(B)[:, None] % 2 == 0), 0.0, mask).astype(np.float32)
    return rewards, values, mask


@functools.lru_cache(maxsize=None)
def build(name, gamma, lam):
    if name == "numpy":
        return lambda r, v, m: gae_numpy(r, v, m, gamma, lam)
    fn = {"scan": functools.partial(gae, method="scan"), "assoc": functools.partial(gae, method="associative"),
          "rlax": gae_rlax}[name]
    return jax.jit(lambda r, v, m: fn(r, v, m, gamma, lam))


def to_np(out):
    return np.asarray(out[0], np.float32)


def check_agreement(r, v, m, gamma, lam, tol):
    """Max abs difference of each variant's advantages from `ops.gae`; asserts < tol."""
    diffs = {}
    for masked in (True, False):
        if not masked:
            m = np.ones_like(m)
        ref = to_np(build("scan", gamma, lam)(r, v, m))
        for name in VARIANTS[1:]:
            if name == "rlax" and masked:
                continue
            got = to_np(build(name, gamma, lam)(r, v, m))
            d = float(np.max(np.abs(got - ref)))
            scale = float(np.max(np.abs(ref))) + 1.0
            assert d <= tol * scale, f"{name} disagrees with ops.gae (masked={masked}): max abs diff {d}"
            diffs[f"max_abs_diff_{name}{'_masked' if masked else '_full'}"] = d
    return diffs


def time_variants(fns, reps):
    """Median ms per variant: each fn is compiled and warmed up first, then timed
    interleaved (``common.time_interleaved``)."""
    calls = {name: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args))) for name, (fn, args) in fns.items()}
    for call in calls.values():
        call()  # compile + warm-up
    return {name: s * 1e3 for name, s in time_interleaved(calls, reps).items()}


def bench_one(B, T, gamma, lam, reps, seed, tol):
    row = dict(bench="gae", B=B, T=T, gamma=gamma, lam=lam, dtype="float32", reps=reps)
    r, v, m = make_inputs(B, T, seed)
    row.update(check_agreement(r, v, m, gamma, lam, tol))
    device_args = tuple(jnp.asarray(x) for x in (r, v, m))
    fns = {name: (build(name, gamma, lam), (r, v, m) if name == "numpy" else device_args) for name in VARIANTS}
    for name, ms in time_variants(fns, reps).items():
        row[f"{name}_ms"] = round(ms, 4)
    for name in VARIANTS[1:]:
        row[f"ratio_{name}_over_scan"] = round(row[f"{name}_ms"] / row["scan_ms"], 3)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--B", type=int, default=256)
    parser.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs diff allowed, relative to max|A| + 1")
    parser.add_argument("--quick", action="store_true", help="B=64, T in {64, 256}, 3 reps")
    parser.add_argument("--no-save", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    if args.quick:
        args.B, args.T, args.reps = 64, [64, 256], 3

    meta = dict(
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        rlax=rlax.__version__ if rlax is not None else None,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host_cpus=os.cpu_count(),
        quick=args.quick,
    )
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for T in args.T:
        row = bench_one(args.B, T, args.gamma, args.lam, args.reps, args.seed, args.tol)
        row.update(meta)
        line = json.dumps(row)
        print(line, flush=True)
        if not args.no_save:
            with RESULTS.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
