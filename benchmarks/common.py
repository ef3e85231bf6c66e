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
