"""Scoring through alpaca-eval offline (its annotator, cache and metrics), and the judge sanity report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lsp.evaluation.judge import LocalHFJudge
from lsp.evaluation.sanity import (
    check_metrics,
    format_sanity,
    known_preference_pairs,
    mismatched_pairs,
    sanity_report,
)
from lsp.evaluation.scoring import cached_count, score_head2head, winrate_block

SUBSET_NAMES = ("helpful_base", "koala", "oasst")


def records(generator: str, outputs: list[str]) -> list[dict]:
    return [{"instruction": f"Question {i}: what about topic {i}?", "output": o, "generator": generator,
             "dataset": SUBSET_NAMES[i % 3]} for i, o in enumerate(outputs)]


def test_winrate_block_counts_ties_both_ways():
    # Candidate is output_2: preferences 2 (win), 1 (loss), 1.5 (tie), 2 (win).
    df = pd.DataFrame({"preference": [2.0, 1.0, 1.5, 2.0], "output_1": ["aa", "aa", "aa", "aa"],
                       "output_2": ["b", "bbb", "b", "bbb"]})
    m = winrate_block(df)
    assert m["win_rate"] == pytest.approx(62.5)  # (2 + 0.5) / 4: alpaca-eval's half-win ties
    assert m["win_rate_ties_as_loss"] == pytest.approx(50.0)  # 2 / 4: the paper's reading
    assert (m["n_wins"], m["n_losses"], m["n_ties"], m["n_total"]) == (2, 1, 1, 4)
    assert m["standard_error_ties_as_loss"] == pytest.approx(pd.Series([1, 0, 0, 1.0]).sem() * 100)
    assert m["avg_length"] == 2.0 and m["baseline_avg_length"] == 2.0


def test_scoring_through_alpaca_eval_offline_then_from_its_cache(tmp_path):
    base = records("base", ["Short.", "A medium answer here.", "Same text", "x", "Another reply", "ok"])
    cand = records("cand", ["A longer, more detailed answer.", "Tiny.", "Same text", "yy", "Reply!", "fine"])
    judge = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path / "cache"), batch_size=3)
    metrics, ann = score_head2head(cand, base, judge, tmp_path / "out", lc=True)
    assert judge.n_pairs == 5  # the identical pair is a tie without asking the judge
    assert metrics["overall"]["n_total"] == 6
    assert set(metrics["subsets"]) == set(SUBSET_NAMES)
    assert sum(s["n_total"] for s in metrics["subsets"].values()) == 6
    assert ann.loc[ann["output_1"] == "Same text", "preference"].item() == 1.5
    assert set(ann["preference"]).issubset({1.0, 1.5, 2.0})
    assert metrics["length_controlled"]["available"] is False  # never approximated offline
    assert metrics["judging"]["new_judgements"] == 5 and metrics["judging"]["seconds_per_pair"] > 0
    assert (tmp_path / "out" / "annotations.json").exists()
    assert cached_count(judge.caching_path) == 6

    again = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path / "cache"), batch_size=3)
    metrics2, _ = score_head2head(cand, base, again, tmp_path / "out2", lc=False)
    assert again.n_pairs == 0 and again._model is None  # all from alpaca-eval's cache
    assert metrics2["overall"] == metrics["overall"] and metrics2["judging"]["new_judgements"] == 0

    # One new candidate output: only that pair is judged.
    cand[1] = {**cand[1], "output": "A different answer."}
    third = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path / "cache"), batch_size=3)
    score_head2head(cand, base, third, tmp_path / "out3", lc=False)
    assert third.n_pairs == 1


def sanity_sets() -> tuple[list[dict], list[dict]]:
    strong = [{"instruction": f"Task {i}", "output": "s" * (10 + 7 * i), "dataset": "koala"} for i in range(8)]
    weak = [{"instruction": f"Task {i}", "output": "w" * (3 + i), "dataset": "koala"} for i in range(8)]
    return strong, weak


def test_sanity_pairs_alternate_sides_and_match_lengths():
    strong, weak = sanity_sets()
    known = known_preference_pairs(strong, weak, 4, seed=0)
    assert [p.expected for p in known] == [1, 2, 1, 2]
    for p in known:
        good = p.output_1 if p.expected == 1 else p.output_2
        assert good.startswith("s")
    mism = mismatched_pairs(strong, 4, seed=0)
    for p in mism:
        own = next(r["output"] for r in strong if r["instruction"] == p.instruction)
        good, bad = (p.output_1, p.output_2) if p.expected == 1 else (p.output_2, p.output_1)
        assert good == own and bad != own and abs(len(bad) - len(own)) == 7  # the nearest length


def test_check_metrics_by_hand():
    strong, weak = sanity_sets()
    pairs = known_preference_pairs(strong, weak, 4, seed=0)  # expected [1, 2, 1, 2]
    df = pd.DataFrame({"preference": [1.0, 1.0, 1.5, 2.0],
                       "output_1": [p.output_1 for p in pairs], "output_2": [p.output_2 for p in pairs]})
    m = check_metrics(pairs, df, flips=[False, True, True, None])
    assert m["agreement"] == 0.5  # pairs 0 and 3 right, 1 wrong, 2 tie
    assert m["tie_rate"] == 0.25 and m["agreement_ties_half"] == 0.625
    assert m["flip_rate"] == pytest.approx(2 / 3)
    assert m["expected_longer_rate"] == 1.0
    # Decisive verdicts: pair 0 longer wins, pair 1 shorter wins, pair 3 longer wins.
    assert m["longer_preferred_rate"] == pytest.approx(2 / 3)


def test_sanity_report_on_a_tiny_judge_uses_the_cache(tmp_path):
    strong, weak = sanity_sets()
    judge = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path))
    report = sanity_report(judge, strong, weak, n_pairs=3, seed=0)
    assert judge.n_pairs == 6 and report["judging"]["new_judgements"] == 6
    for check in ("known_preference", "matched_vs_mismatched"):
        assert report[check]["n"] == 3 and 0 <= report[check]["agreement"] <= 1
        assert report[check]["flip_rate"] is not None
    assert len(report["annotations"]) == 6
    assert "matched vs mismatched" in format_sanity(report, "tiny")
    again = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path))
    cached = sanity_report(again, strong, weak, n_pairs=3, seed=0)
    assert again.n_pairs == 0 and cached.pop("judging")["new_judgements"] == 0
    report.pop("judging")
    assert cached == report


def test_openai_compatible_judge_writes_a_config_alpaca_eval_loads(tmp_path, monkeypatch):
    from alpaca_eval.annotators import PairwiseAnnotator

    from lsp.evaluation.api_judges import (
        AlpacaEvalJudge,
        JudgeUnavailableError,
        OpenAICompatibleJudge,
    )

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeUnavailableError, match="OPENAI_API_KEY"):
        AlpacaEvalJudge(cache_dir=str(tmp_path)).annotator_kwargs()
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    judge = OpenAICompatibleJudge(model_name="my-served-llama", base_url="http://localhost:9/v1",
                                  cache_dir=str(tmp_path))
    annotator = PairwiseAnnotator(**judge.annotator_kwargs())  # builds; calls nothing
    (single,) = annotator.annotators.values()
    assert single.completions_kwargs["model_name"] == "my-served-llama"
    assert single.completions_kwargs["openai_api_base"] == "http://localhost:9/v1"
    assert "{output_1}" in single.prompt_template
    assert "EMPTY" not in json.dumps(single.completions_kwargs)  # the key stays in the environment


@pytest.mark.faults
def test_judging_interrupted_mid_way_resumes_without_judging_a_pair_twice(tmp_path, monkeypatch):
    """Stopped (KeyboardInterrupt) after the judge's second chunk of 2 pairs, then rerun: the
    rerun judges only the pairs the cache lacks, so each of the 8 pairs is judged once."""
    base = records("base", [f"Base answer {i}." for i in range(8)])
    cand = records("cand", [f"Candidate answer number {i}!" for i in range(8)])
    judge_fn = LocalHFJudge.judge
    seen: list[str] = []

    def stops_after_two_chunks(self, instructions, outputs_1, outputs_2):
        if len(seen) >= 4:
            raise KeyboardInterrupt  # Ctrl-C while judging
        seen.extend(instructions)
        return judge_fn(self, instructions, outputs_1, outputs_2)

    monkeypatch.setattr(LocalHFJudge, "judge", stops_after_two_chunks)
    first = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path / "cache"), batch_size=2,
                         chunksize=2)
    with pytest.raises(KeyboardInterrupt):
        score_head2head(cand, base, first, tmp_path / "out", lc=False)
    assert first.n_pairs == 4 and cached_count(first.caching_path) == 4

    monkeypatch.setattr(LocalHFJudge, "judge", judge_fn)
    second = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path / "cache"), batch_size=2,
                          chunksize=2)
    metrics, _ = score_head2head(cand, base, second, tmp_path / "out", lc=False)
    assert second.n_pairs == 4  # only the other four
    assert metrics["overall"]["n_total"] == 8 and cached_count(second.caching_path) == 8
