"""benchmarks/async_rl.py --quick: every variant runs, its timings are finite and positive,
the staleness never exceeds the variant's bound, and the reward workers overlap."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import async_rl  # noqa: E402  (sets nothing: XLA_FLAGS already holds a device count here)


@pytest.mark.slow
def test_quick_run_reports_every_variant(tmp_path):
    out = tmp_path / "async_rl.json"
    # the test session's compilation cache (tests/conftest.py): a second run compiles nothing
    cache = os.environ.get("JAXRL_LLM_TEST_CACHE", os.path.join(tempfile.gettempdir(), "jaxrl_llm_test_jax_cache"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "async_rl.py"), "--quick", "--no-save", "--json", str(out),
         "--compile-cache", cache],
        capture_output=True, text=True, timeout=600, check=False, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"async_rl.py --quick exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    # one JSON object per variant on stdout too, the same rows
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in printed] == [r["variant"] for r in rows]

    assert [r["variant"] for r in rows] == list(async_rl.QUICK_VARIANTS)
    for r in rows:
        k, placement, _ = async_rl.VARIANTS[r["variant"]]
        assert (r["max_staleness"], r["placement"]) == (k, placement)
        for key in ("step_s", "tokens_per_s", "time_sampler_s", "time_logprobs_s", "time_update_s", "trainer_s",
                    "ideal_step_s", "step_over_ideal", "speedup_over_sync", "first_step_s", "compute_floor_s",
                    "decode_roofline_flops_per_s", "train_roofline_flops_per_s",
                    "gemm_train_layers_xla_flops_per_s", "gemm_decode_unembed_xla_flops_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key, r[key])
        assert math.isfinite(r["time_sampling_s"]) and r["time_sampling_s"] >= 0
        assert r["ideal_step_s"] == pytest.approx(max(r["time_sampler_s"], r["trainer_s"]))
        # the staleness bound: step s trains on a sample at most min(s, k) versions old
        assert r["staleness_max"] <= k
        assert r["staleness"] == [min(s, k) for s in range(r["steps"])]
        assert r["loss_finite"] and r["timed_steps"] == r["steps"] - r["skip"] - r["drain_steps"] > 0
        assert r["reward_workers"] == 8 and r["reward_max_concurrency"] > 1  # the verifier threads overlapped
        assert r["quick"] and r["num_devices"] == 8 and r["sampler_devices"] == 4
    by_name = {r["variant"]: r for r in rows}
    assert by_name["sync_colocated"]["speedup_over_sync"] == 1.0
    assert by_name["k2_disaggregated"]["trainer_devices"] == 4
    assert by_name["k2_disaggregated"]["sampler_devices_used"] == 4
