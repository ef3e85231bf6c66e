"""experiments/smollm2_grpo.py --quick: GRPO + LoRA on SmolLM2-135M-Instruct for a few steps
(no learning claim): every output is written and its figures are sane."""

import json
import math

import pytest

from tests.experiments.helpers import run_quick

# shares the xdist worker of tests/models/test_smollm2.py (README: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("smollm2")


@pytest.mark.slow
def test_quick_run_writes_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXRL_LLM_CACHE", str(tmp_path / "cache"))  # converts into a temporary cache
    out, summary = run_quick("smollm2_grpo", tmp_path / "results")

    assert summary["quick"] is True and summary["model"] == "smollm2-135m-instruct"
    for key in ("held_out_greedy_accuracy_before", "held_out_greedy_accuracy_after",
                "held_out_sampled_accuracy_before", "held_out_sampled_accuracy_after",
                "held_out_just_number_before", "held_out_just_number_after",
                "train_reward_first_steps", "train_reward_last_steps"):
        assert 0.0 <= summary[key] <= 1.0, key
    for key in ("response_length_first_steps", "response_length_last_steps"):
        assert 0.0 < summary[key] <= summary["max_new_tokens"], key
    assert summary["held_out_problems"] > 0 and summary["train_problems"] > 0
    assert math.isfinite(summary["seconds_per_step"]) and summary["seconds_per_step"] > 0
    assert len(summary["examples_before"]) == len(summary["examples_after"]) > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(summary["steps"]))
    for r in rows:
        assert 0.0 <= r["reward_mean"] <= 1.0
        assert 0.0 < r["response_length_mean"] <= summary["max_new_tokens"]
        assert all(math.isfinite(r[k]) for k in ("entropy", "grad_norm"))
    assert (out / "smollm2_grpo.png").stat().st_size > 10_000
