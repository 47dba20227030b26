"""Pooled statistics across seeds (lsp.study.pooled): hand-computed per-seed and pooled values,
and the two-level bootstrap checked against the variances it must reproduce."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lsp.study import pooled as P

T, F = True, False


def rec(key: int, strict: list[bool], loose: list[bool] | None = None,
        types: list[str] | None = None) -> dict:
    """One IFEval per-prompt record as lsp.evaluation.ifeval.score_response writes it."""
    return {"key": key, "instruction_id_list": types or [f"t:{i}" for i in range(len(strict))],
            "strict": strict, "loose": loose if loose is not None else strict}


def columns(x: list[float]) -> np.ndarray:
    return np.stack([np.asarray(x, float), np.ones(len(x))], axis=1)  # (n, 2) [x, w=1]


# ---- run names -------------------------------------------------------------------------------
def test_split_run_tolerates_names_without_a_seed():
    from lsp.study.params import run_name, split_run

    assert split_run("lsp-0") == ("lsp", 0)
    assert split_run("lsp_zero-12") == ("lsp_zero", 12)
    assert split_run("base-2") == ("base", 2)
    assert split_run("lsp") == ("lsp", None) and split_run("my-arm") == ("my-arm", None)
    assert run_name("grpo", 1) == "grpo-1"


# ---- hand-computed: 2 seeds x 4 prompts ------------------------------------------------------
SEED0_RUN = [rec(1, [T]), rec(2, [T, F]), rec(3, [F]), rec(4, [T, T])]
SEED0_BASE = [rec(1, [T]), rec(2, [F, F]), rec(3, [F]), rec(4, [F, T])]
SEED1_RUN = [rec(1, [T]), rec(2, [T, T]), rec(3, [T]), rec(4, [F, T])]
SEED1_BASE = [rec(1, [F]), rec(2, [F, F]), rec(3, [F]), rec(4, [F, T])]


def test_ifeval_pooled_by_hand():
    out = P.ifeval_pooled({0: (SEED0_RUN, SEED0_BASE), 1: (SEED1_RUN, SEED1_BASE)}, [],
                          n_boot=2000)
    prompt = out["all"]["prompt_strict"]
    # seed 0: run passes [1,0,0,1], base [1,0,0,0]: d = [0,0,0,1] -> 25 points
    # seed 1: run passes [1,1,1,0], base [0,0,0,0]: d = [1,1,1,0] -> 75 points
    assert prompt["per_seed"] == {0: pytest.approx(25.0), 1: pytest.approx(75.0)}
    assert prompt["estimate"] == pytest.approx(50.0)
    assert prompt["seed_sd"] == pytest.approx(np.std([25, 75], ddof=1))  # 35.355
    assert prompt["n_seeds"] == 2 and prompt["n_prompts"] == {0: 4, 1: 4}
    inst = out["all"]["instruction_strict"]
    # seed 0: followed run 1+1+0+2 = 4, base 1+0+0+1 = 2, of 6 instructions: +2/6 = 33.33
    # seed 1: run 1+2+1+1 = 5, base 0+0+0+1 = 1: +4/6 = 66.67; pooled 50
    assert inst["per_seed"] == {0: pytest.approx(100 / 3), 1: pytest.approx(200 / 3)}
    assert inst["estimate"] == pytest.approx(50.0)
    lo, hi = prompt["ci95"]
    assert lo <= prompt["estimate"] <= hi


def test_seen_and_held_out_prompts_are_pooled_apart():
    run = [rec(1, [T], types=["a:x"]), rec(2, [T], types=["a:x", "b:held"]),
           rec(3, [F], types=["b:held"])]
    base = [rec(1, [F], types=["a:x"]), rec(2, [F], types=["a:x", "b:held"]),
            rec(3, [T], types=["b:held"])]
    out = P.ifeval_pooled({0: (run, base)}, ["b:held"], n_boot=500)
    # seen: prompt 1, d = +1 -> +100; held out: prompts 2 (+1) and 3 (-1) -> 0; all: +1/3
    assert out["seen"]["prompt_loose"]["estimate"] == pytest.approx(100.0)
    assert out["held_out"]["prompt_loose"]["estimate"] == pytest.approx(0.0)
    assert out["all"]["prompt_loose"]["estimate"] == pytest.approx(100 / 3)
    assert out["held_out"]["prompt_loose"]["n_prompts"] == {0: 2}


def test_a_run_and_its_base_must_answer_the_same_prompts():
    with pytest.raises(ValueError, match="same IFEval prompts"):
        P.ifeval_pooled({0: (SEED0_RUN, SEED0_BASE[:3])}, [])


def test_card_form_by_hand():
    # base-0: prompts passed [1,0,0,0] = 25%; instructions followed 1+0+0+1 = 2 of 6 = 33.33%;
    #   card form = (25 + 33.33) / 2 = 29.17
    # base-1: prompts [0,0,0,0] = 0%; instructions 0+0+0+1 = 1 of 6 = 16.67%: card = 8.33
    out = P.card_pooled({0: SEED0_BASE, 1: SEED1_BASE}, n_boot=500)
    assert out["per_seed"] == {0: pytest.approx(175 / 6), 1: pytest.approx(25 / 3)}
    assert out["estimate"] == pytest.approx((175 / 6 + 25 / 3) / 2)
    assert out["card"] == 29.9


def test_alpaca_pooled_by_hand():
    runs = {0: [("koala", 2.0), ("koala", 1.0), ("oasst", 1.5), ("oasst", 2.0)],
            1: [("koala", 1.0), ("koala", 1.0), ("oasst", 2.0), ("oasst", float("nan"))]}
    out = P.alpaca_pooled(runs, n_boot=500)
    # seed 0: scores [1, 0, 0.5, 1] -> 62.5%; seed 1: [0, 0, 1] (NaN dropped) -> 33.33%
    assert out["overall"]["per_seed"] == {0: pytest.approx(62.5), 1: pytest.approx(100 / 3)}
    assert out["overall"]["estimate"] == pytest.approx((62.5 + 100 / 3) / 2)
    # koala: seed 0 50%, seed 1 0% -> 25; oasst: seed 0 75%, seed 1 100% -> 87.5
    assert out["subsets"]["koala"]["estimate"] == pytest.approx(25.0)
    assert out["subsets"]["oasst"]["estimate"] == pytest.approx(87.5)


def test_preferences_as_alpaca_eval_reads_them():
    cols = P.preference_columns([1.0, 2.0, 1.5, 0.0, 1.75, float("nan"), 3.0])
    # 0 is alpaca-eval's other tie code; NaN and 3 are not preferences (dropped)
    assert cols[:, 0].tolist() == [0.0, 1.0, 0.5, 0.5, 0.75] and cols[:, 1].tolist() == [1.0] * 5


# ---- the bootstrap -------------------------------------------------------------------------
def test_one_seed_is_the_prompt_bootstrap_with_the_binomial_variance():
    x = [1.0] * 120 + [0.0] * 280  # p = 0.3, n = 400
    out = P.pooled({7: columns(x)}, n_boot=20_000)
    assert out["n_seeds"] == 1 and out["seed_sd"] is None and out["estimate"] == pytest.approx(30)
    boot = P.two_level_bootstrap([columns(x)], P.ratio, 20_000)
    # SD of a resampled mean: 100 sqrt(p (1 - p) / n) = 100 sqrt(0.21 / 400) = 2.291 points
    assert boot.std() == pytest.approx(100 * np.sqrt(0.21 / 400), rel=0.03)
    lo, hi = out["ci95"]
    assert lo < 30 < hi and hi - lo == pytest.approx(2 * 1.96 * 2.291, rel=0.08)


def test_identical_prompts_within_a_seed_leave_only_the_seed_spread():
    """Seed 0's prompts all differ by 0, seed 1's all by +1: a prompt resample changes nothing, so
    a replicate is the mean of 2 seeds drawn from {0, 100}: 0, 50 or 100 with 1/4, 1/2, 1/4."""
    boot = P.two_level_bootstrap([columns([0.0] * 30), columns([1.0] * 30)], P.ratio, 40_000)
    values, counts = np.unique(boot, return_counts=True)
    assert values.tolist() == [0.0, 50.0, 100.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    out = P.pooled({0: columns([0.0] * 30), 1: columns([1.0] * 30)}, n_boot=40_000)
    assert out["ci95"] == [0.0, 100.0] and out["estimate"] == 50.0
    assert out["seed_sd"] == pytest.approx(np.std([0, 100], ddof=1))


def test_three_seeds_without_prompt_noise_have_the_seed_variance():
    # replicate = mean of 3 draws from {0, 30, 90}: var = popvar / 3 = 1400 / 3
    cols = [columns([v / 100] * 20) for v in (0.0, 30.0, 90.0)]
    boot = P.two_level_bootstrap(cols, P.ratio, 40_000)
    assert boot.var() == pytest.approx(np.var([0, 30, 90]) / 3, rel=0.03)


def test_each_drawn_seed_gets_its_own_prompt_resample():
    """Equal seed means, prompt noise only. Replicate = (1/S) sum_k (m + e_k); with e_k resampled
    independently for every slot k, Var = mean_s(v_s) / S, v_s = 1e4 p (1 - p) / n. Had a seed
    drawn twice reused one prompt resample, Var would be (2 - 1/S) / S mean_s(v_s): 5/3 times it."""
    x = [1.0] * 25 + [0.0] * 75  # p = 0.25, n = 100
    boot = P.two_level_bootstrap([columns(x)] * 3, P.ratio, 40_000)
    v = 1e4 * 0.25 * 0.75 / 100
    assert boot.var() == pytest.approx(v / 3, rel=0.05)


def test_seed_and_prompt_variance_add_up():
    # Var = [popvar_s(m_s) + mean_s(v_s)] / S; m = 20, 40, 60 %; v_s = 1e4 p (1 - p) / 50
    ps = (0.2, 0.4, 0.6)
    cols = [columns([1.0] * round(50 * p) + [0.0] * round(50 * (1 - p))) for p in ps]
    boot = P.two_level_bootstrap(cols, P.ratio, 40_000)
    expected = (np.var([20, 40, 60]) + np.mean([1e4 * p * (1 - p) / 50 for p in ps])) / 3
    assert boot.var() == pytest.approx(expected, rel=0.05)


def test_counted_and_indexed_resamples_have_the_same_distribution():
    """The multinomial shortcut (few distinct rows) and n index draws per resample: same mean
    and variance of a resampled ratio (instruction level: x followed, w instructions)."""
    rng = np.random.default_rng(3)
    cols = np.stack([rng.integers(0, 3, 200), np.full(200, 2)], axis=1).astype(float)
    fast = P.ratio(P.prompt_resamples(cols, 30_000, np.random.default_rng(1)))
    slow = P.ratio(P.prompt_resamples(cols, 30_000, np.random.default_rng(2), max_distinct=0))
    exact = 100 * cols[:, 0].sum() / cols[:, 1].sum()
    assert fast.mean() == pytest.approx(exact, abs=0.1) and slow.mean() == pytest.approx(exact,
                                                                                      abs=0.1)
    assert fast.var() == pytest.approx(slow.var(), rel=0.05)


def test_the_ci_covers_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    per_seed = {s: columns(rng.integers(-1, 2, 541).tolist()) for s in range(3)}
    a, b = P.pooled(per_seed), P.pooled(per_seed)
    assert a["ci95"][0] <= a["estimate"] <= a["ci95"][1]
    assert a == b  # fixed RNG seed


def test_three_seeds_by_541_prompts_in_well_under_a_second():
    rng = np.random.default_rng(0)
    per_seed = {s: columns(rng.integers(-1, 2, 541).tolist()) for s in range(3)}
    start = time.perf_counter()
    P.pooled(per_seed, n_boot=10_000)
    assert time.perf_counter() - start < 1.0  # about 0.06 s alone; the CPUs may be shared


def test_no_seed_is_no_estimate():
    out = P.pooled({})
    assert out["n_seeds"] == 0 and out["estimate"] is None and out["ci95"] is None


# ---- the training signal per reward component (lsp.selfplay.metrics) -------------------------
def test_reward_components_log_their_within_group_std():
    import torch

    from lsp.selfplay.metrics import group_std, reward_metrics
    from lsp.selfplay.records import QueryCheck, SelfPlayBatch

    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # (Nv=2, G=2): group stds 1 and 0
    sp = SelfPlayBatch(step=1, challenger=None,
                       check=QueryCheck(["q1", "q2"], torch.tensor([True, True]), ["", ""]),
                       rewards=rewards, solver_reward=rewards + torch.tensor([[0.0, 2.0]] * 2),
                       self_rewards=torch.tensor([[5.0, 5.0], [4.0, 6.0]]),
                       solver_advantages=torch.zeros(2, 2),
                       reward_components={"judge": torch.tensor([[0.0, 4.0], [1.0, 1.0]]),
                                          "constraints": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
    out = reward_metrics(sp)
    assert group_std(rewards) == pytest.approx(0.5)  # (1 + 0) / 2
    assert out["solver/reward_group_std"] == pytest.approx(0.5)
    # total [[1, 5], [2, 4]]: stds 2, 1 -> 1.5; the overall std would count between groups too
    assert out["solver/total_reward_group_std"] == pytest.approx(1.5)
    assert out["reward/judge_group_std"] == pytest.approx(1.0)  # (2 + 0) / 2
    assert out["reward/constraints_group_std"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2
    assert out["self_reward/group_std"] == pytest.approx(0.5)  # (0 + 1) / 2
