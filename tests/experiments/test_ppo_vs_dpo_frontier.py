"""The PPO-vs-DPO frontier experiment runs in --quick mode and shows its claims.

float32 results differ across CPUs and XLA builds, so the claims are checked on two seeds
(each a ~55 s quick run): every per-seed assertion below held with margin on seeds 0, 1, 2
(and seed 0 with XLA_FLAGS=--xla_cpu_max_isa=AVX2); the two that were thin on one seed are
asserted per seed by sign only and "beyond estimation noise" on the two-seed mean (see
``check_pooled_claims``). Measured on seeds 0 / 1 / 2 (seed 0 with AVX2: as seed 0 except
the PPO KL drops [39, 13.5] SEs and PPO KL ratio 74):
  rm_heldout_accuracy                        0.680 / 0.719 / 0.711     (> 0.6)
  best PPO gold - SFT gold, in SEs           9.7 / 4.8 / 4.0          (per seed > 0; mean > 2 SE)
  PPO KL drop per β step, in SEs             [39, 14.5] / [56, 3.4] / [26, 15.7]  (same)
  DPO KL drop per β step, in SEs (min)       5.1 / 5.5 / 6.7          (> 2)
  PPO / DPO KL(β_min) / KL(β_max)            380 / 31 / 70 ; 91 / 51 / 129   (> 10)
  overopt proxy_end - proxy_start            2.80 / 2.03 / 1.79       (> 0.5)
  overopt gold_start - gold_end              2.10 / 3.56 / 2.99       (> 0)
  PPO β_min proxy - SFT proxy                3.60 / 2.50 / 1.71       (> 1.0)
  SFT gold - DPO β_min gold                  2.29 / 1.28 / 3.25       (> 0.3)
  adaptive final β / start β                 112 / 28 / 25            (> 5)
  adaptive KL gap / fixed KL gap             0.34 / 0.17 / 0.20       (< 0.6)
"""

import itertools
import json
import math

import pytest

from tests.experiments.helpers import run_quick

SEEDS = (0, 1)


def _decreasing_beyond_noise(runs: dict, betas: list, num_se: float = 2.0) -> list[tuple]:
    """Consecutive β pairs whose held-out KL does NOT fall by more than ``num_se`` combined
    standard errors of the KL estimates (empty: monotone with margin)."""
    bad = []
    for lo, hi in itertools.pairwise(betas):
        a, b = runs[str(lo)], runs[str(hi)]
        if not a["kl"] - b["kl"] > num_se * math.hypot(a["kl_se"], b["kl_se"]):
            bad.append((lo, a["kl"], hi, b["kl"]))
    return bad


def _best_ppo_gold_gain(summary: dict) -> tuple[float, float]:
    """(best PPO gold - SFT gold, its standard error) on one seed's held-out prompts."""
    sft = summary["sft"]
    best = max(summary["ppo"].values(), key=lambda r: r["gold"])
    return best["gold"] - sft["gold"], math.hypot(best["gold_se"], sft["gold_se"])


@pytest.mark.slow
def test_ppo_vs_dpo_frontier_quick(tmp_path):
    summaries = []
    for seed in SEEDS:
        out, summary = run_quick("ppo_vs_dpo_frontier", tmp_path / f"seed{seed}", "--seed", str(seed))
        if seed == SEEDS[0]:
            assert (out / "ppo_vs_dpo_frontier.png").stat().st_size > 10_000
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert {r["method"] for r in rows} == {"sft", "ppo", "dpo"}
        check_claims(summary)
        summaries.append(summary)
    check_pooled_claims(summaries)


def check_pooled_claims(summaries: list[dict]) -> None:
    """The claims "beyond estimation noise" that are not robust per seed, on the mean over
    seeds (its standard error: the seeds' standard errors combined, / number of seeds).

    Measured: the best PPO point beat the SFT policy's gold by 9.7 / 4.8 / 4.0 SEs on seeds
    0 / 1 / 2, and PPO's second β step (0.3 → 3.0) lowered the KL by 14.5 / 3.4 / 15.7 SEs
    (seed 1's policy barely moved at β = 0.3: KL 0.49 vs 0.28). Per seed, 2 SEs would leave a
    margin of only ~1.4 SEs against a seed-to-seed spread of ~12. On the two-seed mean the
    same claims hold by 10.3 / 9.7 / 6.2 SEs (gold) and 14.5 / 21.4 / 15.7 SEs (second KL
    step) for seeds {0, 1} / {0, 2} / {1, 2}.
    """
    n = len(summaries)
    gains = [_best_ppo_gold_gain(s) for s in summaries]
    mean_gain = sum(g for g, _ in gains) / n
    se_mean_gain = math.sqrt(sum(se ** 2 for _, se in gains)) / n
    assert mean_gain > 2.0 * se_mean_gain, (gains, mean_gain, se_mean_gain)

    betas = summaries[0]["ppo_betas"]
    assert all(s["ppo_betas"] == betas for s in summaries)
    pooled = {str(b): {"kl": sum(s["ppo"][str(b)]["kl"] for s in summaries) / n,
                       "kl_se": math.sqrt(sum(s["ppo"][str(b)]["kl_se"] ** 2 for s in summaries)) / n}
              for b in betas}
    assert not _decreasing_beyond_noise(pooled, betas), pooled


def check_claims(summary: dict) -> None:
    """The experiment's claims, on its summary.json."""
    for key in ("sft", "ppo", "dpo", "ppo_betas", "dpo_betas", "ppo_kl", "ppo_gold", "dpo_kl", "dpo_gold",
                "best_ppo_gold", "best_dpo_gold", "overopt", "adaptive", "rm_heldout_accuracy", "rm_probes"):
        assert key in summary, key
    sft = summary["sft"]
    ppo, dpo = summary["ppo"], summary["dpo"]
    ppo_betas, dpo_betas = summary["ppo_betas"], summary["dpo_betas"]
    assert len(ppo_betas) >= 3 and len(dpo_betas) >= 3
    assert sft["kl"] == 0.0  # π_ref against itself

    # the proxy RM learned something from the noisy pairs (labels are ~70% consistent at best)
    assert summary["rm_heldout_accuracy"] > 0.6

    # PPO against the proxy improves the gold reward over the SFT policy (best point of the
    # sweep). Per seed by sign (measured ≥ 4.0 combined SEs of the two held-out gold means);
    # by more than two SEs on the mean over seeds, in check_pooled_claims
    best = max(ppo.values(), key=lambda r: r["gold"])
    assert best["gold"] == summary["best_ppo_gold"]
    assert _best_ppo_gold_gain(summary)[0] > 0

    # larger β → smaller KL to π_ref, for PPO and for DPO. DPO: each step beyond estimation
    # noise per seed (measured ≥ 5.1 SEs). PPO: each step lower per seed (measured ≥ 3.4
    # SEs), beyond noise on the mean over seeds, in check_pooled_claims
    assert not _decreasing_beyond_noise(ppo, ppo_betas, num_se=0.0)
    assert not _decreasing_beyond_noise(dpo, dpo_betas)
    assert ppo[str(ppo_betas[0])]["kl"] > 10 * ppo[str(ppo_betas[-1])]["kl"]
    assert dpo[str(dpo_betas[0])]["kl"] > 10 * dpo[str(dpo_betas[-1])]["kl"]

    # over-optimisation at the smallest PPO β: along training the proxy keeps rising while
    # the gold reward stalls or falls (ends below where it started); the final policy's
    # proxy is far above the SFT policy's. (That the gold falls BELOW the SFT policy's holds
    # for most seeds but not all — some proxy RMs happen to penalise spam — so it is not
    # asserted here; see the README.)
    over = summary["overopt"]
    small = ppo[str(ppo_betas[0])]
    assert over["beta"] == ppo_betas[0]
    assert over["proxy_end"] > over["proxy_start"] + 0.5
    assert over["gold_end"] < over["gold_start"]
    assert small["proxy"] > sft["proxy"] + 1.0
    # DPO at its smallest β over-optimises the same preference data (gold below SFT)
    assert dpo[str(dpo_betas[0])]["gold"] < sft["gold"] - 0.3

    # adaptive β: starting from the smallest β, the controller raises β and keeps the KL
    # much nearer its target than the fixed run with the same starting β
    ada = summary["adaptive"]
    assert ada["kl_coef"] == ppo_betas[0]
    assert ada["final_kl_coef"] > 5 * ada["kl_coef"]
    assert ada["kl_gap_adaptive"] < 0.6 * ada["kl_gap_fixed_same_start"]
