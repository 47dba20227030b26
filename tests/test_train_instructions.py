"""The data control arm's training prompts (conf/prompts/train_instructions.jsonl) are disjoint from
both evaluation sets, and the committed file is what its builder writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lsp.evaluation.ifeval import load_prompts
from lsp.evaluation.outputs import load_eval_set
from lsp.selfplay.prompts import OVERLAP_NGRAM, load_prompt_file, word_ngrams

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAIN = REPO / "conf" / "prompts" / "train_instructions.jsonl"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def evaluation_texts() -> list[str]:
    if not (SHARED / "ifeval").is_dir():
        pytest.skip("../shared (the evaluation sets) is not beside the repository")
    alpaca = [r["instruction"] for r in load_eval_set(SHARED / "alpaca_eval" / "gpt4_1106_preview_outputs.json")]
    ifeval = [p["prompt"] for p in load_prompts(SHARED / "ifeval" / "input_data.jsonl")]
    assert len(alpaca) == 805 and len(ifeval) == 541
    return alpaca + ifeval


def test_no_training_prompt_is_or_overlaps_an_evaluation_prompt(evaluation_texts):
    train = load_prompt_file(str(TRAIN))
    assert len(train) == 784 and len({_norm(t) for t in train}) == 784
    held = {_norm(t) for t in evaluation_texts}
    assert not [t for t in train if _norm(t) in held]
    grams = set().union(*(word_ngrams(t) for t in evaluation_texts))
    shared = [t for t in train if word_ngrams(t) & grams]
    assert not shared, f"{len(shared)} training prompts share {OVERLAP_NGRAM} words with an eval set"


def test_the_committed_set_is_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location("make_instructions", REPO / "pipelines" / "make_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = [json.loads(line)["instruction"] for line in TRAIN.read_text().splitlines()]
    assert module.instructions() == committed
