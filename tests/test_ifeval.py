"""IFEval: the prompt file, lm-eval's official checkers on hand-written answers, the figures and
the paired statistics by hand, and the entry point end to end on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lsp.evaluation import ifeval as ife

REPO = Path(__file__).resolve().parents[1]
IFEVAL = REPO.parent / "shared" / "ifeval" / "input_data.jsonl"


def _rec(key, ids, kwargs=None, prompt="Answer the question."):
    return {"key": key, "prompt": prompt, "instruction_id_list": ids,
            "kwargs": kwargs or [{} for _ in ids]}


def _write(tmp_path, lines) -> Path:
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_shared_file_loads_with_its_verified_figures():
    prompts = ife.load_prompts(IFEVAL)
    assert len(prompts) == 541 and len({p["key"] for p in prompts}) == 541
    assert sum(len(p["instruction_id_list"]) for p in prompts) == 834
    assert len({i for p in prompts for i in p["instruction_id_list"]}) == 25


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"key": 2, "prompt": "x", ', "ifeval.jsonl:2: not valid JSON"),
        ('{"key": 2, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"]}',
         "ifeval.jsonl:2: 'kwargs' must be a list"),
        ('{"key": "2", "prompt": "x", "instruction_id_list": [], "kwargs": []}',
         "ifeval.jsonl:2: 'key' must be a int"),
        ('{"key": 2, "prompt": "x", "instruction_id_list": ["no:such"], "kwargs": [{}]}',
         "ifeval.jsonl:2: unknown instruction ids ['no:such']"),
        ('{"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}',
         "ifeval.jsonl:2: duplicate key 1"),
    ],
)
def test_a_malformed_line_is_named(tmp_path, line, message):
    good = json.dumps(_rec(1, ["punctuation:no_comma"]))
    with pytest.raises(ife.IFEvalFormatError) as err:
        ife.load_prompts(_write(tmp_path, [good, line]))
    assert message in str(err.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ife.IFEvalFormatError, match="does not exist"):
        ife.load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("ids", "kwargs", "response", "strict", "loose"),
    [
        (["punctuation:no_comma"], None, "Hello world. No pauses here.", [True], [True]),
        (["punctuation:no_comma"], None, "Hello, world.", [False], [False]),
        (["change_case:english_lowercase"], None, "all of this is lower case.", [True], [True]),
        # The first line breaks the rule; loose drops the first line, strict does not.
        (["change_case:english_lowercase"], None, "Sure!\nall of this is lower case.",
         [False], [True]),
        (["length_constraints:number_words"], [{"relation": "at least", "num_words": 5}],
         "one two three four five six", [True], [True]),
        (["length_constraints:number_words"], [{"relation": "at least", "num_words": 5}],
         "one two", [False], [False]),
        # Markdown bold '**' inside the title: loose removes '*', strict sees no <<title>>.
        (["detectable_format:title", "punctuation:no_comma"], None, "**<<My Poem>>**\nRoses",
         [True, True], [True, True]),
        (["detectable_format:title"], None, "My Poem\nRoses", [False], [False]),
        (["keywords:existence"], [{"keywords": ["ocean", "moon"]}], "The moon over the ocean.",
         [True], [True]),
        (["keywords:existence"], [{"keywords": ["ocean", "moon"]}], "The sun.", [False], [False]),
        (["punctuation:no_comma"], None, "   ", [False], [False]),  # empty answers never pass
    ],
)
def test_official_checkers_on_hand_written_answers(ids, kwargs, response, strict, loose):
    out = ife.score_response(_rec(7, ids, kwargs), response)
    assert out["strict"] == strict and out["loose"] == loose
    assert out["key"] == 7 and out["response"] == response


def _scored(strict, loose, key=0):
    return {"key": key, "instruction_id_list": [f"t:{i}" for i in range(len(strict))],
            "strict": strict, "loose": loose}


def test_a_score_depends_only_on_the_prompt_and_the_response():
    """Prompts whose official checkers draw randomly (letter_frequency with letter '#' or '!',
    langdetect) get the same verdicts however often, and whatever the process's random state was;
    that state is left as it was."""
    import random

    prompts = {p["key"]: p for p in ife.load_prompts(IFEVAL)}
    cases = {1122: "hello ### world, all lower case here.",  # '#': a random letter is checked
             1129: "Sunnis ice cream! Gentle! Try it! Now! Yes! Great! Good!",
             2299: "Ciao, come stai? Sto bene, grazie."}  # language:response_language
    verdicts = set()
    for seed in range(30):
        random.seed(seed)
        before = random.getstate()
        verdicts.add(tuple((k, tuple(r["strict"]), tuple(r["loose"])) for k, text in cases.items()
                           for r in [ife.score_response(prompts[k], text)]))
        assert random.getstate() == before
    assert len(verdicts) == 1


def test_summary_figures_hand_computed():
    rows = [_scored([True, False], [True, True], 0), _scored([True], [True], 1),
            _scored([False], [False], 2), _scored([True, True], [True, True], 3)]
    s = ife.summary(rows)
    # prompt-level strict: prompts 1 and 3 pass -> 2/4; SE sqrt(.5 * .5 / 4) = 0.25
    assert s["prompt_level_strict"] == 0.5 and math.isclose(s["prompt_level_strict_se"], 0.25)
    # prompt-level loose: prompts 0, 1, 3 -> 3/4; SE sqrt(.75 * .25 / 4)
    assert s["prompt_level_loose"] == 0.75
    assert math.isclose(s["prompt_level_loose_se"], math.sqrt(0.75 * 0.25 / 4))
    # instruction-level strict: 4 of 6 followed
    assert math.isclose(s["instruction_level_strict"], 4 / 6)
    assert s["n_prompts"] == 4 and s["n_instructions"] == 6
    assert s["per_type"]["t:1"] == {"n": 2, "strict": 0.5, "loose": 1.0}


def test_clustered_se_hand_computed():
    # c = [1, 1], n = [2, 1]: acc = 2/3; residuals (1 - 4/3)^2 + (1 - 2/3)^2 = 2/9;
    # SE = sqrt(m/(m-1) * 2/9) / 3 = sqrt(4/9) / 3 = 2/9
    acc, se = ife.clustered_accuracy([[True, False], [True]])
    assert math.isclose(acc, 2 / 3) and math.isclose(se, 2 / 9)


def test_paired_difference_hand_computed():
    # candidate passes prompts 0, 1, 3; base passes 1 only: d = [1, 0, 0, 1], mean 0.5;
    # discordant: 2 wins, 0 losses -> exact two-sided binomial p = 2 * 0.5^2 = 0.5
    cand = [_scored([x], [x], k) for k, x in enumerate([True, True, False, True])]
    base = [_scored([x], [x], k) for k, x in enumerate([False, True, False, False])]
    d = ife.paired_difference(cand, base, "loose", n_boot=2000, seed=1)
    assert d["difference"] == 0.5 and (d["wins"], d["losses"]) == (2, 0)
    assert math.isclose(d["mcnemar_p"], 0.5)
    lo, hi = d["ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    same = ife.paired_difference(base, base, "strict")
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="same IFEval prompts"):
        ife.paired_difference(cand[:2], base, "loose")


def test_seen_and_held_out_splits_hand_computed():
    # Types t:1 (seen) and t:2 (held out). Prompt 0 has only t:1 -> seen; prompts 1 and 2 hold t:2
    # -> held out. Candidate passes 0, 1, 2 (loose); base passes 0 only.
    def row(key, ids, ok):
        return {"key": key, "instruction_id_list": ids, "strict": [ok] * len(ids),
                "loose": [ok] * len(ids)}

    cand = [row(0, ["t:1"], True), row(1, ["t:1", "t:2"], True), row(2, ["t:2"], True)]
    base = [row(0, ["t:1"], True), row(1, ["t:1", "t:2"], False), row(2, ["t:2"], False)]
    parts = ife.split_by_types(cand, ["t:2"])
    assert [r["key"] for r in parts["seen"]] == [0] and [r["key"] for r in parts["held_out"]] == [1, 2]
    rep = ife.split_report(cand, ["t:2"], base, n_boot=500, seed=0)
    assert rep["seen"]["n_prompts"] == 1 and rep["held_out"]["n_prompts"] == 2
    assert rep["seen"]["vs_base"]["loose"]["difference"] == 0.0
    held = rep["held_out"]["vs_base"]["loose"]  # both discordant prompts won: p = 2 * 0.5^2
    assert held["difference"] == 1.0 and math.isclose(held["mcnemar_p"], 0.5)
    assert ife.split_report(cand, [], None, 10, 0)["held_out"] == {"n_prompts": 0}


def test_entry_point_end_to_end_on_a_tiny_model(compose_cfg, workdir):
    from lsp.ifeval import run

    cfg = compose_cfg("model=tiny", "ifeval.limit=4", "ifeval.max_new_tokens=6",
                      f"ifeval.path={IFEVAL}", "candidate.name=cand", "eval.generation.amp=none",
                      config_name="ifeval")
    metrics = run(cfg)
    assert metrics["n_prompts"] == 4 and metrics["n_truncated"] == 4  # 6 tokens: all cut off
    # the same model with the same seed as the base: identical answers, zero difference
    assert metrics["vs_base"]["loose"]["difference"] == 0.0
    assert metrics["vs_base"]["loose"]["mcnemar_p"] == 1.0
    records = ife.read_records(workdir / "artifacts/ifeval/cand/records.jsonl")
    assert [r["key"] for r in records] == [p["key"] for p in ife.load_prompts(IFEVAL)[:4]]
    assert all(len(r["strict"]) == len(r["instruction_id_list"]) for r in records)
    stored = json.loads((workdir / "artifacts/ifeval/base/details.json").read_text())
    assert "prompt_level_loose_se" in stored and stored["generation"]["max_new_tokens"] == 6
    assert "per_type" in stored
    headline = json.loads((workdir / "artifacts/ifeval/cand/metrics.json").read_text())
    assert headline == {"prompt_strict": round(100 * metrics["prompt_level_strict"], 1),
                        "prompt_loose": round(100 * metrics["prompt_level_loose"], 1),
                        "delta": 0.0, "p": 1.0}
    # a rerun generates nothing new (resumable store) and gives the same figures
    assert run(cfg)["prompt_level_loose"] == metrics["prompt_level_loose"]
