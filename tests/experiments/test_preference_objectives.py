"""experiments/preference_objectives.py --quick: every objective trains from the same SFT
policy on the same pairs and is evaluated on gold, KL and length."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import preference_objectives as po  # noqa: E402


def test_gold_is_length_blind_and_kto_records_are_unpaired():
    assert po.gold_score("aa") == po.gold_score("aaaa") == 4.0
    assert po.gold_score("abab") == po.gold_score("ab") == 2.0 and po.gold_score("") == 0.0
    records = po.unpaired([{"prompt": "p00:", "chosen": "aab", "rejected": "bcd"}])
    assert records == [{"prompt": "p00:", "completion": "aab", "label": True},
                       {"prompt": "p00:", "completion": "bcd", "label": False}]


@pytest.mark.slow
def test_quick_run(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    proc = subprocess.run([sys.executable, "experiments/preference_objectives.py", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "preference_objectives"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "preference_objectives.png").stat().st_size > 10_000
    mean = summary["mean"]
    assert set(mean) == {"sft", "dpo", "ipo", "kto", "orpo", "simpo"}
    assert mean["sft"]["kl"] == 0.0
    for method in ("dpo", "ipo", "kto", "simpo"):  # each moves the policy towards the gold judge's choice
        assert mean[method]["gold"] > mean["sft"]["gold"] + 0.3, (method, mean)
        assert mean[method]["kl"] > 0.1
