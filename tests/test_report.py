"""The study report on small but real inputs: history.csv and samples.jsonl written by the trainer's
own callbacks, selection.json by `select_checkpoint`, details.json assembled from the scoring and
sanity functions `lsp.evaluate` uses (alpaca-eval's `get_winrate` included)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from lsp.evaluation.judge import LocalHFJudge
from lsp.evaluation.outputs import SUBSETS
from lsp.evaluation.sanity import (
    check_metrics,
    eval_pair_stats,
    known_preference_pairs,
    mismatched_pairs,
)
from lsp.evaluation.scoring import length_controlled, winrate_block
from lsp.evaluation.selection import Candidate, select_checkpoint
from lsp.selfplay.callbacks import MetricsHistory, SampleTable
from lsp.study.markdown import fenced
from lsp.study.report import build_report, load_arm, main, pick_steps, sanity_verdict

QUERIES = {1: "Write a haiku about rivers.", 2: "Explain ```code fences``` in Markdown.",
           4: "Prove that sqrt(2) is irrational, step by step."}


# ---- training run: the trainer's callbacks write the files -----------------------------------
def step_metrics(step: int, self_reward: bool) -> dict[str, float]:
    m = {"solver/reward_mean": 0.5 * step, "solver/reward_std": 0.1,
         "challenger/reward_mean": -0.5 * step, "kl/solver": 0.01 * step,
         "kl/challenger": 0.02 * step, "rollout/query_len_mean": 20.0 + step,
         "rollout/answer_len_mean": 50.0, "perf/step_s": 3.0, "perf/tokens_per_s": 100.0}
    if self_reward:
        m["self_reward/mean"] = 3.0 + 0.1 * step
    return m


def write_history(run_dir: Path, steps: range, self_reward: bool, offset: float = 0.0) -> None:
    cb = MetricsHistory(path=str(run_dir / "history.csv"))  # a new instance appends, like a resume
    for step in steps:
        metrics = {k: v + offset for k, v in step_metrics(step, self_reward).items()}
        trainer = SimpleNamespace(global_step=step, is_global_zero=True)
        module = SimpleNamespace(last_metrics=metrics)
        cb.on_train_batch_end(trainer, module, None, None, 0)


def fake_batch(step: int, self_reward: bool) -> SimpleNamespace:
    """What `sample_rows` reads of a SelfPlayBatch: 2 queries (the second invalid), 2 answers."""
    query = QUERIES.get(step, f"Query text at step {step}.")
    return SimpleNamespace(
        step=step, group_size=2,
        check=SimpleNamespace(queries=[query, "###"], valid=torch.tensor([True, False]),
                              reasons=["", "truncated"]),
        challenger_reward=torch.tensor([-1.25, -3.0]),
        challenger_advantages=torch.tensor([0.9, -0.9]),
        solver=SimpleNamespace(completions=[f"answer {step}a", f"answer {step}b"]),
        rewards=torch.tensor([[1.0, 1.5]]), solver_advantages=torch.tensor([[-0.25, 0.25]]),
        self_rewards=torch.tensor([[4.0, 5.0]]) if self_reward else None,
    )


def write_samples(run_dir: Path, steps: range, self_reward: bool) -> None:
    table = SampleTable(every_n_steps=2, path=str(run_dir / "samples.jsonl"))
    for step in steps:
        table.on_rewards_computed(SimpleNamespace(loggers=[], is_global_zero=True), None,
                                 fake_batch(step, self_reward))


def write_run(root: Path, arm: str, self_reward: bool) -> Path:
    run = root / "train" / arm
    run.mkdir(parents=True)
    write_history(run, range(1, 5), self_reward)
    (run / "config.yaml").write_text(
        f"algo:\n  name: {arm}\n  beta: 0.05\n"
        f"  self_reward:\n    enabled: {str(self_reward).lower()}\n"
        "rollout:\n  num_queries: 2\n  group_size: 2\noptim:\n  lr: 3.0e-06\n"
        "model:\n  policy: tiny:causal\nreward:\n  _target_: lsp.selfplay.rewards.LLMJudgeReward\n")
    write_samples(run, range(1, 5), self_reward)
    return run


# ---- selection: the real select_checkpoint with a fake scorer --------------------------------
def write_selection(root: Path, arm: str) -> Path:
    out = root / "select" / arm
    scores = {0: 0.1, 2: 0.4, 4: 0.3}

    def answer(cand: Candidate, prompts: list[str]) -> list[str]:
        return [f"{cand.step}: {p}" for p in prompts]

    class Scorer:
        def score(self, prompts, answers):
            step = int(answers[0].split(":")[0])
            spread = torch.arange(len(prompts)) * 0.01
            return SimpleNamespace(values=scores[step] + spread)

    cands = [Candidate(s, f"run/checkpoints/step_{s:06d}") for s in scores]
    provenance = {"name": "test prompts", "n": 3}
    select_checkpoint(cands, ["p1", "p2", "p3"], answer, Scorer(), out, provenance)
    return out


# ---- evaluation: details.json as lsp.evaluate assembles it -----------------------------------
def annotations(seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for s in SUBSETS:
        for i in range(6):
            flipped = rng.random() < 0.8
            pref = rng.choice([1.0, 2.0, 2.0, 1.5])
            raw = json.dumps({"preference": pref, "flipped": flipped})  # the local judge's record
            rows.append({"instruction": f"[{s}] question {i}", "output_1": "base answer " * (i + 1),
                         "output_2": "arm answer " * (i + 2), "dataset": s, "preference": pref,
                         "preference_raw_completion": raw})
    return pd.DataFrame(rows)


def sanity(seed: int) -> dict:
    strong = [{"instruction": f"Task {i}", "output": "s" * (10 + 7 * i)} for i in range(8)]
    weak = [{"instruction": f"Task {i}", "output": "w" * (3 + i)} for i in range(8)]
    report = {}
    for name, pairs in (("known_preference", known_preference_pairs(strong, weak, 4, seed)),
                        ("matched_vs_mismatched", mismatched_pairs(strong, 4, seed))):
        df = pd.DataFrame([{"output_1": p.output_1, "output_2": p.output_2, "preference": 1.0}
                           for p in pairs])
        report[name] = check_metrics(pairs, df, [True, True, False, True])
    return report


def write_eval(root: Path, arm: str, seed: int, judge: dict) -> Path:
    df = annotations(seed)
    metrics = {
        "candidate": {"model": f"artifacts/train/{arm}/checkpoints/step_000002", "generator": arm},
        "base": {"model": "tiny:causal", "generator": "base"},
        "eval_set": {"path": "x.json", "n_total": 30, "n_evaluated": 30, "k_per_subset": 6,
                     "seed": 0},
        "generation": {"temperature": 0.01},
        "judge": judge,
        "vs_base": {
            "overall": winrate_block(df),
            "subsets": {name: winrate_block(g) for name, g in sorted(df.groupby("dataset"))},
            "length_controlled": length_controlled(df, None, True),
            "judging": {"new_judgements": 30, "judge_seconds": 1.0, "wall_seconds": 1.2,
                        "seconds_per_pair": 0.03},
        },
        "sanity": {**sanity(seed), "evaluation_pairs": eval_pair_stats(df)},
        "seconds_total": 12.0,
    }
    out = root / "evaluate" / arm
    out.mkdir(parents=True)
    (out / "details.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture
def study(tmp_path) -> dict:
    judge = LocalHFJudge(cache_dir=str(tmp_path / "cache")).describe()  # the embedded SmolLM2 judge
    arms = {"lsp": True, "lsp_zero": False}
    train = {a: write_run(tmp_path, a, sr) for a, sr in arms.items()}
    # lsp was resumed from step 2: steps 3-4 logged again, with other values (the last row counts).
    write_history(train["lsp"], range(3, 5), True, offset=0.5)
    select = {a: write_selection(tmp_path, a) for a in arms}
    evals = {a: write_eval(tmp_path, a, i, judge) for i, a in enumerate(arms)}
    return {"root": tmp_path, "train": train, "select": select, "eval": evals}


def table_rows(md: str) -> list[list[str]]:
    """The cells of every Markdown table row, stripped (tabulate pads the columns)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in md.splitlines() if line.startswith("|")]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 20_000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 300


def test_full_report(study, tmp_path):
    out = tmp_path / "report"
    md = build_report(study["train"], study["select"], study["eval"], out).read_text()
    for name in ("training_curves.png", "win_rates.png", "selection.png"):
        assert_png(out / name)
        assert f"]({name})" in md
    metrics = json.loads((study["eval"]["lsp"] / "details.json").read_text())
    overall = metrics["vs_base"]["overall"]
    rows = table_rows(md)
    row = next(r for r in rows if r[0] == "lsp" and r[1].startswith("step 2 (score"))
    assert f"{overall['win_rate']:.1f} ± {overall['standard_error']:.1f}" in row
    loss, loss_se = overall["win_rate_ties_as_loss"], overall["standard_error_ties_as_loss"]
    assert f"{loss:.1f} ± {loss_se:.1f}" in row
    koala = metrics["vs_base"]["subsets"]["koala"]
    assert f"{koala['win_rate']:.1f} ± {koala['standard_error']:.1f}" in row
    assert any(r[0] == "lsp_zero" and r[1].startswith("step 2 (score") for r in rows)
    assert "unavailable" in row
    # The judge sanity figures sit between the win-rate table and the training section.
    results, training = md.index("## Results"), md.index("## Training")
    known = metrics["sanity"]["known_preference"]
    assert f"{100 * known['agreement']:.0f}% (n={known['n']}" in md[results:training]
    assert "Length-independent check" in md[results:training]
    assert "weak embedded model" in md[results:training] and "not evidence of quality" in md
    # Challenger queries at the first, a middle and the last logged step (1, 2, 4) per arm.
    assert md.count("#### Step 1 ") == 2 and md.count("#### Step 4 ") == 2
    assert all(q in md for q in QUERIES.values()) and "````text" in md  # the query with ``` in it
    assert "solver reward 1.25 (mean of 2)" in md and "self-reward 4.50" in md
    assert "invalid (truncated)" in md
    assert "## How this report was produced" in md and "Missing inputs" not in md
    # runs without seed suffixes and without per-prompt records: nothing to pool, said so; the
    # histories log the overall reward std only (before the within-group metrics)
    assert "No per-prompt records to pool" in md and "**The protocol is missing**" in md
    assert "| lsp_zero | 1      | -         | 0.100" in md and "predate the within-group" in md


def test_resumed_history_keeps_the_last_row_per_step(study):
    arm = load_arm("lsp", study["train"]["lsp"], None, None)
    assert [int(r["step"]) for r in arm.history] == [1, 2, 3, 4]
    assert arm.history[-1]["solver/reward_mean"] == pytest.approx(2.5)


def test_report_without_evaluation_or_selection(study, tmp_path):
    out = tmp_path / "report"
    (out).mkdir()
    (out / "win_rates.png").write_bytes(b"stale")
    corrupt = tmp_path / "corrupt" / "details.json"
    corrupt.parent.mkdir()
    corrupt.write_text("[1, 2")  # an evaluation killed while writing
    missing = {"lsp": tmp_path / "evaluate" / "nope", "lsp_zero": corrupt}
    md = build_report(study["train"], {}, missing, out).read_text()
    assert_png(out / "training_curves.png")
    assert not (out / "win_rates.png").exists() and not (out / "selection.png").exists()
    assert "No evaluation (`details.json`) for: lsp, lsp_zero." in md
    assert "does not exist" in md and "unreadable" in md
    assert "No `selection.json` for any arm." in md
    assert QUERIES[4] in md


def test_report_with_nothing_but_an_evaluation(study, tmp_path):
    md = build_report({}, {}, {"lsp": study["eval"]["lsp"]}, tmp_path / "r").read_text()
    assert_png(tmp_path / "r" / "win_rates.png")
    assert "No training runs given." in md and "step 2" in md


def test_cli_discovers_arms_under_root(study, tmp_path, capsys):
    path = main(["--root", str(study["root"]), "--out", str(tmp_path / "cli"), "--title", "Smoke"])
    md = path.read_text()
    assert md.startswith("# Smoke") and "Runs: lsp, lsp_zero." in md
    assert "report:" in capsys.readouterr().out


def test_sanity_verdicts():
    strong = {"kind": "openai_compatible", "annotator": "x", "model": "meta-llama/Llama-4-Maverick"}
    good = {"matched_vs_mismatched": {"agreement_ties_half": 0.9}}
    bad = {"matched_vs_mismatched": {"agreement_ties_half": 0.55}}
    assert "passes" in sanity_verdict({"judge": strong, "sanity": good})
    assert "fails" in sanity_verdict({"judge": strong, "sanity": bad})
    assert "unchecked" in sanity_verdict({"judge": strong})
    weak = {"kind": "local_hf", "model": "embedded:smollm2-135m-instruct"}
    assert "weak" in sanity_verdict({"judge": weak, "sanity": good})


def test_pick_steps_and_fences():
    rows = [{"step": s} for s in (1, 10, 20, 30, 40)]
    assert pick_steps(rows, 3) == [1, 20, 40] and pick_steps(rows[:2], 3) == [1, 10]
    assert fenced("a ````` b")[0] == "``````text"


def test_grpo_arm_has_curves_but_no_challenger_queries(study, tmp_path):
    grpo = write_run(tmp_path, "grpo", False)  # config.yaml: algo.name grpo
    md = build_report({**study["train"], "grpo": grpo}, study["select"], study["eval"],
                      tmp_path / "r").read_text()
    assert ["grpo", "grpo"] in [r[:2] for r in table_rows(md)]  # the training table, beside lsp
    assert "No Challenger in grpo" in md and "### grpo" not in md and "### lsp_zero" in md


def test_history_keeps_metrics_that_first_appear_after_step_one(tmp_path):
    """Step 1 may have no Solver metrics (every query invalid): later ones must not be dropped."""
    path = tmp_path / "history.csv"
    first = {"challenger/reward_mean": 0.0, "rollout/invalid_queries": 4.0}
    later = {**first, "solver/reward_mean": 4.5, "kl/solver": 0.01}
    cb = MetricsHistory(str(path))
    for step, metrics in ((1, first), (2, later), (3, later)):
        if step == 3:
            cb = MetricsHistory(str(path))  # a resumed run: a new instance reads the header
        cb.on_train_batch_end(SimpleNamespace(global_step=step, is_global_zero=True),
                              SimpleNamespace(last_metrics=metrics),
                              None, None, 0)
    rows = load_arm("x", tmp_path, None, None).history
    assert [r["solver/reward_mean"] for r in rows] == [None, 4.5, 4.5]
    assert [r["rollout/invalid_queries"] for r in rows] == [4.0, 4.0, 4.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]  # no temporary left


def _ifeval_details(acc: float, vs_base: bool) -> dict:
    d = {"n_prompts": 10, "n_truncated": 2,
         "per_type": {"punctuation:no_comma": {"n": 4, "strict": acc, "loose": acc},
                      "change_case:english_lowercase": {"n": 6, "strict": 0.5, "loose": 0.5}}}
    for k in ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose",
              "instruction_level_loose"):
        d[k], d[f"{k}_se"] = acc, 0.05
    if vs_base:
        d["vs_base"] = {m: {"difference": 0.2, "ci95": [0.0, 0.4], "mcnemar_p": 0.125,
                            "wins": 3, "losses": 1} for m in ("strict", "loose")}
    return d


def test_report_ifeval_section_and_type_chart(tmp_path):
    root = tmp_path / "ifeval"
    for name, acc in (("base", 0.3), ("lsp", 0.5)):
        (root / name).mkdir(parents=True)
        (root / name / "details.json").write_text(json.dumps(_ifeval_details(acc, name != "base")))
    path = build_report({}, {}, {"lsp": tmp_path / "none", "lsp_zero": tmp_path / "none"},
                        tmp_path / "out", ifeval_dir=root)
    text = path.read_text()
    assert "## Results: IFEval" in text
    # base row: 30.0 ± 5.0 four times, no delta; lsp: +20.0 points [+0.0, +40.0], p = 0.12
    rows = table_rows(text)
    assert ["base", *["30.0 ± 5.0"] * 4, "-", "-", "2/10"] in rows
    assert ["lsp", "50.0 ± 5.0"] in [r[:2] for r in rows]
    assert "+20.0 [+0.0, +40.0], p = 0.12 (3+/1-)" in text
    assert "Missing: lsp_zero." in text
    assert (tmp_path / "out" / "ifeval_types.png").stat().st_size > 5_000
