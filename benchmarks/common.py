"""Shared plumbing of the benchmark scripts: run metadata and the JSON-lines output
(printed, and appended to benchmarks/results/<name>.jsonl unless --no-save)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import statistics
import time

import jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def run_metadata(quick: bool, **versions) -> dict:
    """Backend, versions, host size, time: what makes rows from different runs comparable."""
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        **versions,
        "host_cpus": os.cpu_count(),
        # other jobs on a shared box move single-thread timings (and ratios) a lot: see README
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": quick,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def emit(name: str, row: dict, save: bool = True) -> None:
    """Prints ``row`` as one JSON line and appends it to results/<name>.jsonl."""
    line = json.dumps(row)
    print(line, flush=True)
    if save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with (RESULTS_DIR / f"{name}.jsonl").open("a") as f:
            f.write(line + "\n")


# Published dense peaks (no sparsity) of the accelerators benchmarks are run on, keyed by
# a substring of `device_kind`. Utilisation is reported against these.
DEVICE_PEAKS = {
    "H100": {"bf16_flops": 989.4e12, "tf32_flops": 494.7e12, "hbm_bytes_per_s": 3.35e12},
    "H200": {"bf16_flops": 989.4e12, "tf32_flops": 494.7e12, "hbm_bytes_per_s": 4.8e12},
}


def device_peaks() -> dict | None:
    """The peak table entry of the first JAX device, or None (e.g. on a CPU)."""
    kind = str(jax.devices()[0].device_kind)
    return next((peaks for key, peaks in DEVICE_PEAKS.items() if key in kind), None)


def torch_device() -> str:
    """'cuda' when both PyTorch and JAX see a GPU (side-by-side rows on the same chip)."""
    import torch

    return "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"


def time_interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per call of each (already warmed-up, blocking) fn. The calls are
    interleaved, one of every fn per round, so load from other processes on a shared
    machine hits all variants alike."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def resolve_model(spec: str | None) -> str | None:
    """``--model`` of the rollout / train-step / memory benchmarks: a named model
    (``smollm2-135m-instruct``, converted into the cache on first use) or a local HF
    checkpoint folder → the folder; None (the default random toy model) stays None."""
    if spec is None:
        return None
    from jaxrl_llm.models.named import resolve_spec

    return resolve_spec(spec)


def decoder_flops_per_token(cfg, context: float) -> dict[str, float]:
    """Forward FLOPs of one token through a dense decoder (``ModelConfig``), by matmul
    shape: ``layers`` = the attention and SwiGLU projections of every layer plus the
    attention scores and weighted sum over ``context`` keys, ``unembed`` = the [d, V]
    output projection. The input embedding is a lookup (no FLOPs). A forward + backward
    is 3× these (PaLM, App. B: 6·N per token with causal attention ``context`` = L/2)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    projections = d * q + 2 * d * kv + q * d + 3 * d * f
    attention = 2 * cfg.num_heads * hd * context  # q·k and p·v
    return {"layers": 2.0 * cfg.num_layers * (projections + attention), "unembed": 2.0 * d * cfg.vocab_size}


def gemm_flops_per_s(rows: int, k: int, n: int, stack: int = 1, reps: int = 7, torch_too: bool = True) -> dict:
    """Measured FLOP/s of ``x[rows, k] @ w_i[k, n]`` for ``stack`` distinct weights w_i
    (so a stack as large as a model's layers streams its weights from memory as a
    decode step does, instead of hitting the cache), jitted XLA and, with ``torch_too``,
    PyTorch; median of ``reps`` warm calls each. Under ``--single-thread`` both run on one
    thread: the per-core ceiling the benchmarks' CPU rows are a fraction of."""
    flops = 2.0 * rows * k * n * stack
    keys = jax.random.split(jax.random.PRNGKey(0), stack + 1)
    x = jax.random.normal(keys[0], (rows, k), jax.numpy.float32)
    ws = [jax.random.normal(key, (k, n), jax.numpy.float32) * k**-0.5 for key in keys[1:]]
    # separate weight arrays, one dot each, as a decoder's layers are: XLA:CPU ran this
    # fastest of the forms tried (an einsum of x into a stacked [s, k, n] weight, without
    # batch dims, was 3-4x slower and would understate the ceiling)
    matmul = jax.jit(lambda x, ws: [x @ w for w in ws])
    fns = {"xla": lambda: jax.block_until_ready(matmul(x, ws))}
    if torch_too:
        import numpy as np
        import torch

        tx, tws = torch.from_numpy(np.array(x)), [torch.from_numpy(np.array(w)) for w in ws]
        fns["torch"] = lambda: [torch.matmul(tx, w) for w in tws]
    for fn in fns.values():
        fn()  # compile / warm
    return {name: flops / seconds for name, seconds in time_interleaved(fns, reps).items()}


def roofline_rate(flops: dict[str, float], rates: dict[str, float]) -> float:
    """FLOP/s of a workload whose ``flops[shape]`` each ran at the measured ``rates[shape]``:
    total FLOPs / Σ FLOPs ÷ rate (the time the measured GEMMs would take for it)."""
    return sum(flops.values()) / sum(flops[s] / rates[s] for s in flops)


def measure_gemm_roofline(cfg, rows: int, reps: int = 7) -> dict[str, dict[str, float]]:
    """The model's two matmul shapes at ``rows`` rows, measured by `gemm_flops_per_s`:
    ``layers`` = [d, d_ff] over ``num_layers`` distinct weights (a decoder layer's
    projections stream as many bytes per FLOP), ``unembed`` = [d, V]. → {shape: {lib: FLOP/s}}."""
    shapes = {"layers": (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers),
              "unembed": (cfg.hidden_size, cfg.vocab_size, 1)}
    return {name: gemm_flops_per_s(rows, k, n, stack, reps) for name, (k, n, stack) in shapes.items()}


def roofline_fields(gemm: dict[str, dict[str, float]], flops: dict[str, float]) -> dict[str, float]:
    """Row fields of a `measure_gemm_roofline` result: every measured rate, and the
    roofline FLOP/s of a workload with per-shape ``flops`` at the faster library's rate."""
    fields = {f"gemm_{shape}_{lib}_flops_per_s": rate for shape, libs in gemm.items() for lib, rate in libs.items()}
    fields["roofline_flops_per_s"] = roofline_rate(flops, {shape: max(libs.values()) for shape, libs in gemm.items()})
    return fields
