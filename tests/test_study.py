"""The study's arms and runs (lsp.study): every arm runs once per seed from the base model; the
GRPO data control trains on the cleaned prompt set; the prompts stage drops duplicates and every
instruction that overlaps AlpacaEval or IFEval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc.utils.hydra import compose_and_dump

from lsp.selfplay.prompts import clean_instructions, load_prompt_file
from lsp.study.params import (
    BASE_MODEL,
    StudyConfigError,
    load_params,
    run_name,
    split_run,
    train_config,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(tmp_path: Path, *overrides: str):
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "pipeline", "", list(overrides))
    return load_params(out)


def test_the_default_study_has_the_control_arm_and_three_seeds(tmp_path):
    params = compose(tmp_path)
    assert set(params.arms) == {"lsp", "lsp_zero", "grpo"} and list(params.seeds) == [0, 1, 2]
    assert params.prompt_sets.grpo.path == "conf/prompts/train_instructions.jsonl"
    assert list(compose(tmp_path, "study=smoke").seeds) == [0, 1]
    assert list(compose(tmp_path, "study=cpu_quick").seeds) == [0]


def test_runs_are_named_by_arm_and_seed():
    assert run_name("lsp_zero", 2) == "lsp_zero-2" and split_run("lsp_zero-2") == ("lsp_zero", 2)
    assert split_run("base-0") == ("base", 0) and split_run("lsp") == ("lsp", None)


def test_every_run_starts_from_the_base_with_its_own_seed(tmp_path):
    params = compose(tmp_path, "study=smoke")
    for arm in params.arms:
        cfg = train_config(params, arm, 1)
        assert cfg.seed == 1 and cfg.name == f"{arm}-1" and cfg.run_dir == f"artifacts/train/{arm}-1"
        assert cfg.model.policy == cfg.model.reference == str(BASE_MODEL)


def test_the_control_arm_trains_on_the_prompt_set_with_the_same_reward(tmp_path):
    params = compose(tmp_path, "study=smoke")
    cfg, lsp = train_config(params, "grpo", 0), train_config(params, "lsp", 0)
    assert cfg.algo.name == "grpo" and cfg.algo.scale_std is True
    assert cfg.rollout.prompt_file == "artifacts/queries/grpo.jsonl" and lsp.rollout.prompt_file is None
    assert cfg.reward == lsp.reward  # the same reward as the self-play arms
    assert compose(tmp_path, "study=paper").arms.grpo.optim.lr == pytest.approx(1e-6)  # Table 1


@pytest.mark.parametrize("arm,queries,match", [
    ("grpo", "challenger", "a grpo arm needs a prompt set"),
    ("lsp", "grpo", "a self-play arm queries: challenger"),
    ("grpo", "nope", "expected challenger or a prompt set"),
])
def test_an_arm_whose_queries_do_not_fit_its_algo_is_a_clear_error(tmp_path, arm, queries, match):
    params = compose(tmp_path, "study=smoke", f"arms.{arm}.queries={queries}")
    with pytest.raises(StudyConfigError, match=match):
        train_config(params, arm, 0)


def test_seeds_must_be_distinct(tmp_path):
    from lsp.config import ConfigError

    with pytest.raises(ConfigError, match="seeds"):
        compose(tmp_path, "seeds=[0,0]")


def test_clean_instructions_drops_duplicates_and_held_out():
    kept, counts = clean_instructions(
        ["Write a poem.", "write a  POEM.", "Name three rivers.", "Explain tides.", "Explain  tides."],
        held_out=["name three RIVERS."])
    assert kept == ["Write a poem.", "Explain tides."]
    assert counts == {"read": 5, "duplicates": 2, "held_out_overlap": 1, "kept": 2, "overlap_ngram": 8}
    # a shared run of 8 words is an overlap too, 7 are not
    held = ["Please write a short story about a dragon today."]
    near = ["Now write a short story about a dragon today, please.",  # 8 shared words
            "Write a short story about a dragon tomorrow."]  # 7 shared words
    assert clean_instructions(near, held)[0] == [near[1]]


def test_alpaca_records_keep_their_input(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Sort these.", "input": "3, 1, 2", "output": "1, 2, 3"},
                                {"instruction": "Say hi.", "input": "", "output": "hi"}]))
    assert load_prompt_file(str(path)) == ["Sort these.\n\n3, 1, 2", "Say hi."]


def test_prompts_stage_writes_each_arms_queries(tmp_path, monkeypatch):
    """A data arm: its set cleaned of duplicates and of AlpacaEval and IFEval prompts; a self-play
    arm: the Challenger prompt it samples from."""
    import runpy

    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps([{"instruction": "Name three rivers.", "output": "x",
                                     "generator": "g", "dataset": "koala"}]))
    ifeval = tmp_path / "ifeval.jsonl"
    ifeval.write_text(json.dumps({"key": 1, "prompt": "Write a limerick about a cat.",
                                  "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    source = tmp_path / "mine.txt"
    source.write_text("Write a poem.\nName three rivers.\nWrite a poem.\nwrite a limerick about a CAT.\n")
    compose(tmp_path, f"grpo_prompt_file={source}", f"eval.eval_set.path={eval_set}",
            f"ifeval.path={ifeval}")  # -> tmp_path/params.yaml
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["prompts.py"])
    runpy.run_path(str(CONF.parent / "pipelines/prompts.py"), run_name="__main__")
    lines = Path("artifacts/queries/grpo.jsonl").read_text().splitlines()
    assert [json.loads(x)["instruction"] for x in lines] == ["Write a poem."]
    stats = json.loads(Path("artifacts/queries/grpo.json").read_text())
    assert stats["duplicates"] == 1 and stats["held_out_overlap"] == 2 and stats["kept"] == 1
    challenger = json.loads(Path("artifacts/queries/lsp.jsonl").read_text())["challenger_prompt"]
    assert "template" in challenger.lower() and Path("artifacts/queries/lsp_zero.jsonl").is_file()


def test_one_knob_sets_every_arms_beta_and_an_arm_can_differ(tmp_path):
    params = compose(tmp_path, "algo.beta=0.1", "arms.lsp_zero.algo.beta=0.2")
    assert {a: params.arms[a].algo.beta for a in params.arms} == {
        "lsp": 0.1, "lsp_zero": 0.2, "grpo": 0.1}
    assert compose(tmp_path).arms.lsp.algo.beta == 0.05  # the paper's, for every arm


def test_the_cpu_study_rewards_with_judge_and_constraints_and_s_switches_it(tmp_path):
    # The embedded study's deviation (README): judge + verifiable constraints for both self-play
    # arms, the judge reading the prepared base; `-S reward=...` switches it, study=paper keeps
    # Skywork.
    params = compose(tmp_path)
    for arm in ("lsp", "lsp_zero", "grpo"):
        cfg = train_config(params, arm, 0)
        assert cfg.reward._target_ == "lsp.selfplay.constraints.CompositeReward"
        assert set(cfg.reward.components) == {"judge", "constraints"}
        assert cfg.reward.components.judge.reward.model == str(BASE_MODEL)
        assert cfg.rollout.solver.engine == cfg.rollout.challenger.engine == "vllm"
    judge_only = train_config(compose(tmp_path, "reward=llm_judge"), "lsp", 0)
    assert judge_only.reward._target_ == "lsp.selfplay.rewards.LLMJudgeReward"
    paper = compose(tmp_path, "study=paper")
    assert "Skywork" in paper.reward.model
    switched = compose(tmp_path, "study=paper", "reward=judge_constraints")
    assert switched.reward._target_ == "lsp.selfplay.constraints.CompositeReward"


def test_params_yaml_is_checked_against_the_study_schema(tmp_path):
    from lsp.config import ConfigError

    with pytest.raises(ConfigError, match=r"params.yaml: invalid config: unknown key "
                                          r"'arms.lsp.bogus'.*\(keys of arms.lsp: algo, queries"):
        compose(tmp_path, "+arms.lsp.bogus=1")
    with pytest.raises(ConfigError, match="select.generation.temperature=0: must be > 0"):
        compose(tmp_path, "select.generation.temperature=0")


def test_a_killed_arm_resumes_only_with_the_same_config_and_code(tmp_path, monkeypatch):
    """train@<arm>'s outs persist across DVC reruns: resume after a kill, else start afresh."""
    from lsp.study.params import RUN_STAMP, mark_complete, resume_or_clear, train_dir

    monkeypatch.chdir(tmp_path)
    cfg = train_config(compose(tmp_path), "lsp", 0)
    assert resume_or_clear(cfg, "lsp-0") is False  # first run: a fresh folder with its stamp
    run = train_dir("lsp-0")
    (run / "checkpoints" / "step_000020").mkdir(parents=True)
    (run / "history.csv").write_text("step\n1\n")
    assert resume_or_clear(cfg, "lsp-0") is True  # killed, rerun unchanged: resume, keep files
    assert (run / "history.csv").exists()

    changed = cfg.copy()
    changed.optim.lr = 2 * cfg.optim.lr
    assert resume_or_clear(changed, "lsp-0") is False  # changed params: emptied
    assert not (run / "history.csv").exists() and (run / RUN_STAMP).exists()

    (run / "history.csv").write_text("step\n1\n")
    mark_complete("lsp-0")  # a finished run is rerun only because something changed (or -f)
    assert resume_or_clear(changed, "lsp-0") is False
    assert not (run / "history.csv").exists()


def test_study_runs_nest_under_one_parent_per_arm_in_the_study_experiment(tmp_path, monkeypatch):
    """study_logger against a real SQLite store: one experiment per study, marked as a training
    experiment; the arm's stage runs nest under its parent run and carry the study, arm, DVC
    experiment and commit tags; a retrained arm (new_parent) gets a new parent, later stages nest
    under it; another DVC experiment gets its own parents; the figures land on the parent."""
    from mlflow import MlflowClient

    from lsp.study.params import study_logger
    from lsp.tracking import log_run, publish_figures

    params = compose(tmp_path, "study=smoke")
    params.logger.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params.logger.artifact_location = str(tmp_path / "mlartifacts")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")

    def stage(name, what, new=False):
        lg = study_logger(params, name, what, new_parent=new)
        run = log_run(lg, lg.run_name, {}, {"x": 1.0}, tags={"lsp.stage": what})
        publish_figures({"step": 2, "note": "text"}, tmp_path / "metrics" / f"{name}-{what}.json", lg, what)
        return lg.parent_run_id, run

    p1, train1 = stage("lsp-0", "train", new=True)
    p1b, select1 = stage("lsp-0", "select")
    p2, train2 = stage("lsp-0", "train", new=True)       # retrained from step 0
    p2b, score2 = stage("lsp-0", "alpaca_eval")
    pbase, ife = stage("base-0", "ifeval")
    monkeypatch.setenv("DVC_EXP_NAME", "beta-01")
    p3, train3 = stage("lsp-0", "train")                 # another DVC experiment: its own parent
    assert p1 == p1b and p2 == p2b and len({p1, p2, pbase, p3}) == 4

    client = MlflowClient(params.logger.tracking_uri)
    experiment = client.get_experiment_by_name("lsp-study-smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 10  # 4 parents, 6 stage runs
    for child, parent in [(train1, p1), (select1, p1), (train2, p2), (score2, p2), (ife, pbase),
                          (train3, p3)]:
        tags = runs[child].data.tags
        assert tags["mlflow.parentRunId"] == parent
        assert tags["lsp.study"] == "smoke" and tags["lsp.git_commit"] == "abc123"
    assert runs[train3].data.tags["lsp.dvc_exp"] == "beta-01"
    assert runs[score2].data.tags["lsp.dvc_exp"] == "workspace"
    assert {runs[p].info.run_name for p in (p1, p2, pbase, p3)} == {"lsp-0", "base-0", "lsp-0 (beta-01)"}
    assert runs[p1].data.tags["lsp.role"] == "parent" and runs[p1].info.status == "FINISHED"
    assert runs[p1].data.params == {"arm": "lsp", "seed": "0", "algo": "lsp", "beta": "0.05",
                                    "queries": "challenger", "reward": "CompositeReward",
                                    "max_steps": "2", "self_reward": "logits"}
    assert runs[pbase].data.params == {"model": "tiny:causal", "seed": "0"}
    # the parent's end time is its last stage's: it spans the arm's stages
    assert runs[p1].info.end_time >= runs[select1].info.start_time
    assert runs[p2].data.metrics == {"train/step": 2.0, "alpaca_eval/step": 2.0}
    assert runs[select1].info.run_name == "lsp-0-select"
    assert json.loads((tmp_path / "metrics/lsp-0-select.json").read_text()) == {"step": 2, "note": "text"}
