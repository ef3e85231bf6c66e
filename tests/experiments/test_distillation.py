"""The distillation experiment: every method gets the same teacher-call budget, and the
``--quick`` run writes every output with sane values.

No learning assertion: --quick (120 teacher SFT steps, ~24 student steps per method) is a
smoke test of the plumbing, too short for the student to learn the task; the full run
(800 student steps per method, several minutes per seed on 2 CPU cores) is too long for
CI. Its measured figures are in experiments/distillation.py and experiments/README.md.
"""

import json
import math
import sys

import pytest

from tests.experiments.helpers import ROOT, run_quick

sys.path.insert(0, str(ROOT / "experiments"))
import distillation  # the experiment module, imported by name as the sandbox needs


@pytest.mark.parametrize("steps, pool", [(distillation.STEPS, distillation.POOL_PER_PROMPT),
                                         (distillation.QUICK_STEPS, distillation.QUICK_POOL_PER_PROMPT)])
def test_methods_spend_the_same_teacher_budget(steps, pool):
    n_train = 70
    budget = steps * distillation.BATCH
    for method in distillation.METHODS:
        last = distillation.steps_for_budget(method, budget, n_train, pool)
        spent = distillation.teacher_calls(method, last, n_train, pool)
        assert budget - distillation.BATCH < spent <= budget, method
    # the off-policy token-level methods pay for their pool of teacher samples up front
    assert distillation.teacher_calls("token_kd", 0, n_train, pool) == pool * n_train
    assert distillation.teacher_calls("gkd", 0, n_train, pool) == pool * n_train
    assert distillation.teacher_calls("on_policy", 0, n_train, pool) == 0
    assert distillation.teacher_calls("seq_kd", 0, n_train, pool) == 0


@pytest.mark.slow
def test_distillation_quick(tmp_path):
    out, s = run_quick("distillation", tmp_path)
    assert (out / "distillation.png").stat().st_size > 10_000
    assert s["quick"] and s["seeds"] == [0]
    budget = distillation.QUICK_STEPS * distillation.BATCH
    assert s["budget_teacher_calls"] == budget
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == set(distillation.METHODS)
    for r in rows:
        assert 0 < r["teacher_calls"] <= budget or r["step"] == 0, r
        for key in ("held_out_greedy", "held_out_sampled", "train_greedy", "train_sampled"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key)
        for key in ("held_out_kl", "held_out_forward_kl", "train_kl", "train_forward_kl"):
            assert math.isfinite(r[key]) and r[key] >= 0.0, (r["method"], key)
    for method, final in s["final"].items():
        assert final["steps"]["0"] == distillation.steps_for_budget(
            method, budget, 70, distillation.QUICK_POOL_PER_PROMPT)
        # even a few steps pull the student towards the teacher (measured: KL 4.27 → 2.5–2.9)
        first = next(r for r in rows if r["method"] == method and r["step"] == 0)
        assert final["held_out_kl"]["mean"] < first["held_out_kl"] - 0.5, method
    for split in ("held_out", "train"):
        assert 0.0 <= s["teacher_accuracy"]["0"][split]["greedy"] <= 1.0
    assert math.isfinite(s["seconds"])
