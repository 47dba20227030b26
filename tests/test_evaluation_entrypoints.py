"""`python -m lsp.evaluate` and `python -m lsp.select` as testable functions on composed configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lsp.evaluate import evaluate, generator_name
from lsp.evaluation.outputs import SUBSETS
from lsp.select import run_reward_config, select
from lsp.selfplay.records import RewardOutput


def write_sets(folder: Path, per_subset: int = 2) -> tuple[Path, Path]:
    """A made-up eval set (strong references) and a weaker reference set for the sanity check."""
    strong = [{"instruction": f"[{s}] Explain item {i} of {s} briefly.", "dataset": s, "generator": "strong",
               "output": f"A careful, complete answer about item {i} of {s}. " * (2 + i)}
              for s in SUBSETS for i in range(per_subset)]
    weak = [{**r, "generator": "weak", "output": f"meh {i}"} for i, r in enumerate(strong)]
    (folder / "strong.json").write_text(json.dumps(strong))
    (folder / "weak.json").write_text(json.dumps(weak))
    return folder / "strong.json", folder / "weak.json"


def tiny_checkpoint(run_dir: Path, step: int, seed: int) -> Path:
    """A tiny causal LM saved like a trainer checkpoint (weights perturbed: a 'trained' model)."""
    from lsp.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("tiny:causal")
    model, tok = load_causal_lm(path), load_tokenizer(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    folder = run_dir / "checkpoints" / f"step_{step:06d}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "lsp_checkpoint.json").write_text(json.dumps({"step": step}))
    return folder


def eval_overrides(tmp: Path, strong: Path, weak: Path) -> list[str]:
    return [
        "model=tiny", "eval=quick", "eval.subset.k_per_subset=1", "eval.generation.max_new_tokens=6",
        f"eval.eval_set.path={strong}", f"eval.sanity.weak_path={weak}", "eval.sanity.n_pairs=2",
        "eval.judge.model=tiny:causal", f"eval.judge.cache_dir={tmp / 'judge_cache'}",
        "eval.baselines=[base,reference]", f"out_dir={tmp / 'eval'}",
    ]


def test_configs_compose(compose_cfg):
    cfg = compose_cfg(config_name="evaluate")
    assert cfg.eval.generation.temperature == 0.01 and cfg.eval.baselines == ["base"]
    assert cfg.eval.judge._target_.endswith("LocalHFJudge") and cfg.candidate.model == cfg.model.policy
    quick = compose_cfg("eval=quick", "eval/judge=openai_compatible", config_name="evaluate")
    assert quick.eval.subset.k_per_subset == 4 and quick.eval.judge.model_name
    sel = compose_cfg("run_dir=somewhere", config_name="select")
    assert sel.generation.temperature == 0.01 and sel.reward._target_


def test_evaluate_end_to_end_then_again_without_rejudging(compose_cfg, workdir, capsys):
    import os

    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # this test's store (see workdir)
    strong, weak = write_sets(workdir)
    ckpt = tiny_checkpoint(workdir / "run", 5, seed=1)
    with mlflow.start_run(experiment_id=mlflow.create_experiment("training")) as train_run:
        pass  # the trainer's run, named in the checkpoint's marker
    (ckpt / "lsp_checkpoint.json").write_text(json.dumps({"step": 5, "mlflow_run_id": train_run.info.run_id}))
    cfg = compose_cfg(*eval_overrides(workdir, strong, weak), f"candidate.model={ckpt}", config_name="evaluate")
    metrics = evaluate(cfg)
    out = workdir / "eval"
    assert json.loads((out / "details.json").read_text()) == json.loads(json.dumps(metrics))
    # metrics.json: the headline figures only (lsp.headline)
    assert json.loads((out / "metrics.json").read_text()) == {
        "win_rate": round(metrics["vs_base"]["overall"]["win_rate"], 1),
        "win_se": round(metrics["vs_base"]["overall"]["standard_error"], 1),
        "lc_win_rate": metrics["vs_base"]["length_controlled"]["reason"]}
    name = generator_name(str(ckpt))
    assert name == "run_step_000005" and metrics["candidate"]["generator"] == name
    for kind in ("vs_base", "vs_reference"):
        m = metrics[kind]
        assert m["overall"]["n_total"] == 5 and set(m["subsets"]) == set(SUBSETS)
        assert "win_rate_ties_as_loss" in m["overall"] and m["length_controlled"]["available"] is False
    assert metrics["vs_reference"]["judging"]["new_judgements"] == 5
    assert metrics["sanity"]["known_preference"]["n"] == 2
    assert "Judge sanity" in capsys.readouterr().out
    records = json.loads((out / "model_outputs" / f"{name}.json").read_text())
    assert [set(r) for r in records] == [{"instruction", "output", "generator", "dataset"}] * 5

    cache = (workdir / "judge_cache").glob("*.json")
    before = {p: p.read_text() for p in cache}
    again = evaluate(cfg)
    assert again["vs_base"]["judging"]["new_judgements"] == 0
    assert again["vs_reference"]["judging"]["new_judgements"] == 0
    assert again["vs_reference"]["overall"] == metrics["vs_reference"]["overall"]
    assert {p: p.read_text() for p in before} == before  # nothing new in the judge's cache

    runs = mlflow.search_runs(experiment_names=["lsp"])
    assert len(runs) == 2 and "metrics.eval/win_rate" in runs
    history = mlflow.MlflowClient().get_metric_history(train_run.info.run_id, "eval/win_rate")
    assert [m.step for m in history] == [5, 5]  # the training run gets the headline numbers too


class LengthScorer:
    """A deterministic stand-in for the training reward: longer answers score higher."""

    def score(self, instructions, responses):
        values = torch.tensor([float(len(r)) for r in responses])
        return RewardOutput(values=values, parse_failed=torch.zeros(len(responses), dtype=torch.bool))


def test_select_end_to_end_on_tiny_checkpoints(compose_cfg, workdir):
    run = workdir / "run"
    for step, seed in ((10, 1), (20, 2)):
        tiny_checkpoint(run, step, seed)
    prompts = workdir / "prompts.json"
    prompts.write_text(json.dumps({"name": "t", "prompts": [{"instruction": "Say hi."}, {"instruction": "Count."}]}))
    cfg = compose_cfg("model=tiny", f"run_dir={run}", f"out_dir={workdir / 'sel'}", f"validation_prompts={prompts}",
                      "generation.max_new_tokens=12", "generation.temperature=1.0", config_name="select")
    result = select(cfg, scorer=LengthScorer())
    saved = json.loads((workdir / "sel" / "selection.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [c["step"] for c in saved["candidates"]] == [10, 20]
    for c in saved["candidates"]:
        answers = json.loads((workdir / "sel" / "answers" / f"step_{c['step']:06d}.json").read_text())
        assert c["score"] == pytest.approx(sum(len(a["answer"]) for a in answers) / len(answers))
    assert saved["chosen"]["score"] == max(c["score"] for c in saved["candidates"])

    import mlflow

    runs = mlflow.search_runs(experiment_names=["lsp"])
    assert runs["metrics.select/chosen_step"].item() == saved["chosen"]["step"]


def test_select_uses_the_runs_own_reward(compose_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("reward:\n  _target_: lsp.selfplay.rewards.SequenceClassifierReward\n  model: tiny:reward\n")
    cfg = compose_cfg(f"run_dir={run}", config_name="select")
    reward, source = run_reward_config(cfg)
    assert reward.model == "tiny:reward" and source.endswith("config.yaml")
    cfg = compose_cfg(f"run_dir={run}", "reward_from_run=false", config_name="select")
    assert run_reward_config(cfg)[0]._target_ == cfg.reward._target_


@pytest.mark.slow
def test_embedded_judge_returns_valid_verdicts(tmp_path):
    from lsp.evaluation.judge import LocalHFJudge

    judge = LocalHFJudge(cache_dir=str(tmp_path), max_response_tokens=64)
    (v,) = judge.judge(["What is the capital of France?"], ["Paris."], ["I like turtles."])
    assert 0 < v.p12 < 1 and 0 < v.p21 < 1 and v.p_valid > 0.05  # it answers with a digit
    assert v.preference("debiased") in (1.0, 1.5, 2.0)
