"""Checkpoint selection on the project's validation prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lsp.evaluation.selection import (
    choose,
    load_validation_prompts,
    run_candidates,
    select_checkpoint,
)
from lsp.selfplay.records import RewardOutput


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    folder = run_dir / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "lsp_checkpoint.json").write_text(json.dumps({"step": step}))
    return folder


class TableScorer:
    """Scores an answer by a fixed table keyed on the step the answer names (selection logic only)."""

    def __init__(self, table: dict[int, float]):
        self.table, self.calls = table, 0

    def score(self, instructions: list[str], responses: list[str]) -> RewardOutput:
        self.calls += 1
        values = [self.table[int(re.search(r"step (\d+)", r).group(1))] for r in responses]
        return RewardOutput(values=torch.tensor(values), parse_failed=torch.zeros(len(values), dtype=torch.bool))


def test_only_complete_checkpoints_are_candidates(tmp_path):
    fake_checkpoint(tmp_path, 300)
    fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200, complete=False)  # the trainer died while writing it
    assert [c.step for c in run_candidates(tmp_path)] == [100, 300]


def test_selection_picks_the_best_of_fake_scored_checkpoints(tmp_path):
    for step in (100, 200, 300):
        fake_checkpoint(tmp_path / "run", step)
    candidates = run_candidates(tmp_path / "run")
    prompts, provenance = load_validation_prompts()
    scorer = TableScorer({100: 0.2, 200: 0.9, 300: 0.5})
    result = select_checkpoint(candidates, prompts, lambda c, ps: [f"answer from step {c.step}"] * len(ps),
                               scorer, tmp_path / "out", provenance)
    assert result["chosen"]["step"] == 200 and result["chosen"]["path"].endswith("step_000200")
    assert scorer.calls == 3
    saved = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert [(c["step"], round(c["score"], 6)) for c in saved["candidates"]] == [(100, 0.2), (200, 0.9), (300, 0.5)]
    assert saved["chosen"]["step"] == 200 and saved["validation_prompts"]["n"] == len(prompts)
    assert len(json.loads((tmp_path / "out" / "answers" / "step_000300.json").read_text())) == len(prompts)


def test_ties_go_to_the_later_step_and_empty_runs_fail():
    assert choose([{"step": 1, "score": 0.5}, {"step": 2, "score": 0.5}])["step"] == 2
    with pytest.raises(ValueError, match="no complete checkpoints"):
        select_checkpoint([], ["q"], lambda c, p: [], TableScorer({}), "unused")


def test_validation_prompts_are_ours_not_alpaca_eval():
    prompts, provenance = load_validation_prompts()
    assert 24 <= len(prompts) <= 48 and len(set(prompts)) == len(prompts)
    assert provenance["name"] == "lsp-validation-v1" and len(provenance["sha256"]) == 16
    shared = Path(__file__).resolve().parents[2] / "shared" / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
    if shared.exists():  # where the AlpacaEval copy is at hand, check there is no overlap
        alpaca = {r["instruction"].strip().lower() for r in json.loads(shared.read_text())}
        assert not alpaca & {p.strip().lower() for p in prompts}



def test_selection_under_the_constraint_environment(tmp_path):
    # A reward that scores constraints: every validation prompt gets seeded constraints (never a
    # held-out type), and each answer is scored against its own prompt's.
    from omegaconf import OmegaConf

    from lsp.select import with_constraints
    from lsp.selfplay.constraints import HELD_OUT_TYPES, ConstraintReward, constraint_score

    cfg = OmegaConf.create({"run_dir": str(tmp_path), "seed": 0})
    prompts = ["Name a fruit.", "Describe the sea."]
    shown, scorer = with_constraints(cfg, prompts, ConstraintReward())
    assert [s.split("\n\n")[0] for s in shown] == prompts
    drawn = [scorer.constraints[s] for s in shown]
    assert all(len(c) == 1 and c[0].instruction_id not in HELD_OUT_TYPES for c in drawn)
    out = scorer.score(shown[::-1], ["an apple", "blue, wide"])
    expected = [constraint_score(drawn[1], "an apple"), constraint_score(drawn[0], "blue, wide")]
    assert out.values.tolist() == expected
    assert with_constraints(cfg, prompts, ConstraintReward())[0] == shown  # same seed, same draw
    plain = object.__new__(type("Plain", (), {"score": lambda self, i, r: None}))
    assert with_constraints(cfg, prompts, plain) == (prompts, plain)
