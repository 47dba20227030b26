"""Evaluation sets, stratified subsets and resumable generation of model_outputs.json records."""

from __future__ import annotations

import json

import pytest

from lsp.evaluation.outputs import (
    RECORD_KEYS,
    SUBSETS,
    EvalSetUnavailableError,
    GenerationSettings,
    StoreMismatchError,
    as_model_outputs,
    generate_outputs,
    load_eval_set,
    sample_answers,
    stratified_subset,
)


def eval_records(per_subset: dict[str, int]) -> list[dict]:
    """A made-up AlpacaEval-format set (tests never need the real AlpacaEval files)."""
    return [
        {"instruction": f"[{name}] request number {i}: say something about {name}.",
         "output": f"Reference answer {i} for {name}.", "generator": "reference", "dataset": name}
        for name, n in per_subset.items() for i in range(n)
    ]


def test_load_eval_set_reads_local_file_and_reports_missing_one(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps(eval_records({"koala": 2, "vicuna": 1})))
    assert [r["dataset"] for r in load_eval_set(path)] == ["koala", "koala", "vicuna"]
    with pytest.raises(EvalSetUnavailableError, match="does not exist"):
        load_eval_set(tmp_path / "missing.json")
    path.write_text(json.dumps(eval_records({"koala": 1}) * 2))
    with pytest.raises(EvalSetUnavailableError, match="repeats instructions"):
        load_eval_set(path)


def test_stratified_subset_takes_k_per_subset_deterministically():
    records = eval_records({"helpful_base": 9, "koala": 7, "oasst": 8, "selfinstruct": 12, "vicuna": 2})
    sub = stratified_subset(records, 4, seed=0)
    counts = {name: sum(r["dataset"] == name for r in sub) for name in SUBSETS}
    assert counts == {"helpful_base": 4, "koala": 4, "oasst": 4, "selfinstruct": 4, "vicuna": 2}
    assert sub == stratified_subset(records, 4, seed=0)  # fixed seed: same draw
    assert sub != stratified_subset(records, 4, seed=1)
    positions = [records.index(r) for r in sub]
    assert positions == sorted(positions)  # the eval set's order is kept
    assert stratified_subset(records, None, 0) == records
    # A subset's draw does not depend on the other subsets present.
    only_koala = [r for r in records if r["dataset"] == "koala"]
    assert [r for r in sub if r["dataset"] == "koala"] == stratified_subset(only_koala, 4, 0)


def test_generated_records_have_the_alpaca_eval_format(tmp_path):
    records = eval_records({"koala": 2, "oasst": 1})
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    out = generate_outputs("tiny:causal", records, "my_model", settings, tmp_path)
    assert len(out) == 3
    for rec, src in zip(out, records, strict=True):
        assert tuple(rec) == (*RECORD_KEYS, "truncated")  # 6 tokens: every answer cut off
        assert rec["truncated"] is True and tuple(as_model_outputs([rec], "m")[0]) == RECORD_KEYS
        assert rec["instruction"] == src["instruction"] and rec["dataset"] == src["dataset"]
        assert rec["generator"] == "my_model" and isinstance(rec["output"], str)
        assert rec["output"] != src["output"]  # the model's answer, not the reference
    meta = json.loads((tmp_path / "my_model.meta.json").read_text())
    assert meta["temperature"] == 0.01 and meta["model"] == "tiny:causal"
    assert meta["chat_date"] == "26 Jul 2024"  # answers under another date are not reused


def test_generation_settings_refuse_a_zero_temperature_or_top_p(compose_cfg):
    """Checked at the config boundary (lsp.config.schema.GenerationSection), for every entry point."""
    from lsp.config import ConfigError, validate

    with pytest.raises(ConfigError, match="eval.generation.temperature=0: must be > 0"):
        validate(compose_cfg("eval.generation.temperature=0", config_name="evaluate"), "evaluate")
    with pytest.raises(ConfigError, match=r"eval.generation.top_p=0: must be in \(0, 1\]"):
        validate(compose_cfg("eval.generation.top_p=0", config_name="ifeval"), "ifeval")
    with pytest.raises(ConfigError, match="generation.temperature=0: must be > 0"):
        validate(compose_cfg("generation.temperature=0", "run_dir=r", config_name="select"), "select")


@pytest.mark.faults
def test_interrupted_generation_resumes_without_generating_twice(tmp_path):
    records = eval_records({"koala": 3, "vicuna": 2})
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    asked: list[str] = []

    def crash_on_second_batch(model, tok, instructions, s):
        if asked:
            raise KeyboardInterrupt  # the process dies after the first batch was stored
        asked.extend(instructions)
        return sample_answers(model, tok, instructions, s)

    with pytest.raises(KeyboardInterrupt):
        generate_outputs("tiny:causal", records, "m", settings, tmp_path, answer=crash_on_second_batch)
    stored = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert sorted(r["instruction"] for r in stored) == sorted(asked) and len(asked) == 2

    resumed: list[str] = []

    def counting(model, tok, instructions, s):
        resumed.extend(instructions)
        return sample_answers(model, tok, instructions, s)

    out = generate_outputs("tiny:causal", records, "m", settings, tmp_path, answer=counting)
    assert sorted(resumed) == sorted(r["instruction"] for r in records if r["instruction"] not in asked)
    assert [r["instruction"] for r in out] == [r["instruction"] for r in records]
    # Everything is stored now: a third call loads no model and generates nothing.
    again: list[str] = []
    assert generate_outputs("tiny:causal", records, "m", settings, tmp_path,
                            answer=lambda *a: again.extend(a[2]) or []) == out
    assert again == []


def test_store_made_with_other_settings_is_refused(tmp_path):
    records = eval_records({"koala": 1})
    generate_outputs("tiny:causal", records, "m", GenerationSettings(max_new_tokens=2), tmp_path)
    with pytest.raises(StoreMismatchError, match="max_new_tokens"):
        generate_outputs("tiny:causal", records, "m", GenerationSettings(max_new_tokens=3), tmp_path)
    # batch_size is not part of the identity: resuming with another batch size is fine.
    generate_outputs("tiny:causal", records, "m", GenerationSettings(max_new_tokens=2, batch_size=3), tmp_path)


def test_hub_loader_offline_fails_with_a_clear_message():
    import os

    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("only meaningful offline (HF_HUB_OFFLINE=1)")
    with pytest.raises(EvalSetUnavailableError, match="eval.eval_set.path"):
        load_eval_set(None)
