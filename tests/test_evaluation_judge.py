"""The local HF pairwise judge: decision rules, the pair record, and a tiny model in both orders."""

from __future__ import annotations

import json
import math

import pytest

from lsp.evaluation.judge import LocalHFJudge, PairVerdict, order_flipped, parse_pair_record


def test_pair_record_round_trip_and_rejection():
    from pathlib import Path

    from lsp.evaluation.judge import CONFIG_DIR

    template = (Path(CONFIG_DIR) / "pair_record.txt").read_text()
    text = template.replace("{instruction}", "Q?\nline 2").replace("{output_1}", "A\n").replace("{output_2}", "")
    assert parse_pair_record(text) == ("Q?\nline 2", "A\n", "")
    with pytest.raises(ValueError):
        parse_pair_record("a plain prompt")


def test_decision_rules_by_hand():
    # p12 = 0.9 (output_1 shown first), p21 = 0.2 (output_1 shown second): a first-position bias.
    # logit(0.9) = 2.1972, logit(0.2) = -1.3863 -> debiased log-odds s = 0.4055 > 0: output_1.
    v = PairVerdict(p12=0.9, p21=0.2, p_valid=0.5)
    assert v.log_odds == pytest.approx((math.log(9) + math.log(0.25)) / 2)
    assert v.preference("debiased") == 1.0
    assert v.preference("debiased", tie_margin=0.5) == 1.5  # |s| = 0.41 within the margin
    assert v.preference("weighted") == pytest.approx(2 - 1 / (1 + math.exp(-0.4055)), abs=1e-4)
    assert v.flipped and v.preference("agreement") == 1.5  # the orders' own votes disagree
    agree = PairVerdict(p12=0.3, p21=0.4, p_valid=0.5)  # both orders prefer output_2
    assert not agree.flipped and agree.preference("agreement") == 2.0 == agree.preference("debiased")
    stored = json.loads(v.completion("debiased"))
    assert stored["preference"] == 1.0 and order_flipped({"preference_raw_completion": json.dumps(stored)})
    assert order_flipped({"preference_raw_completion": float("nan")}) is None


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    return LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path_factory.mktemp("jc")), batch_size=2)


def test_tiny_judge_valid_verdicts_in_both_orders(tiny_judge):
    q = ["What is 2 + 2?", "Name a colour.", "Say hi."]
    a = ["4", "Blue, like the sky on a clear day.", "Hi!"]
    b = ["Five, I think.", "Trains.", "Hello there, how are you doing today?"]
    forward = tiny_judge.judge(q, a, b)
    backward = tiny_judge.judge(q, b, a)
    assert tiny_judge.n_pairs == 6
    for f, r in zip(forward, backward, strict=True):
        assert 0 < f.p12 < 1 and 0 < f.p21 < 1 and 0 < f.p_valid <= 1
        # Swapping the outputs swaps the two presentation orders: the same two forward passes.
        assert r.p12 == pytest.approx(1 - f.p21, abs=1e-4)
        assert r.p21 == pytest.approx(1 - f.p12, abs=1e-4)
        assert r.log_odds == pytest.approx(-f.log_odds, abs=1e-3)
        assert r.preference("weighted") == pytest.approx(3 - f.preference("weighted"), abs=1e-4)
        for decision in ("debiased", "weighted", "agreement"):
            assert 1 <= f.preference(decision) <= 2


def test_fn_completions_answers_alpaca_eval_records(tiny_judge):
    from pathlib import Path

    from lsp.evaluation.judge import CONFIG_DIR

    template = (Path(CONFIG_DIR) / "pair_record.txt").read_text()
    prompt = template.replace("{instruction}", "Q").replace("{output_1}", "A").replace("{output_2}", "B")
    out = tiny_judge([prompt, "not a pair record", prompt])
    assert len(out["completions"]) == 3 and len(out["time_per_example"]) == 3
    assert json.loads(out["completions"][0])["preference"] in (1.0, 1.5, 2.0)
    assert out["completions"][1] == ""  # alpaca-eval's parser stores it as a missing annotation
    assert out["completions"][2] == out["completions"][0]


def test_fingerprint_names_the_cache_and_model_loads_lazily(tmp_path):
    j = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path))
    assert j._model is None  # a fully cached run never loads the judge
    other = LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path), decision="weighted")
    assert j.fingerprint != other.fingerprint and j.caching_path != other.caching_path
    assert j.fingerprint == LocalHFJudge(model="tiny:causal", cache_dir=str(tmp_path)).fingerprint
    # an unknown `decision` is refused by the config schema (tests/test_config_schema.py)
