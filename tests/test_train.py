"""End-to-end training on the tiny smoke model, MLflow store, checkpoints and resume."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch
from omegaconf import open_dict
from transformers import AutoModelForCausalLM

from lsp.config import ConfigError, check_models, validate
from lsp.models import resolve_model
from lsp.selfplay.callbacks import RolloutHooks
from lsp.train import train

REQUIRED = ["solver/reward_mean", "solver/reward_std", "challenger/reward_mean", "kl/solver",
            "kl/challenger", "self_reward/mean", "rollout/query_len_mean",
            "rollout/answer_len_mean", "perf/tokens_per_s"]


def metric_keys(db: str) -> set[str]:
    with sqlite3.connect(db) as con:
        return {row[0] for row in con.execute("select distinct key from metrics")}


def test_smoke_two_steps_change_every_parameter_and_log_to_sqlite(compose_cfg, workdir):
    cfg = compose_cfg("experiment=smoke", "trainer.max_steps=2")
    initial = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.policy))
    result = train(cfg)

    assert result["global_step"] == 2
    trained = AutoModelForCausalLM.from_pretrained(result["last_checkpoint"])
    before, after = dict(initial.named_parameters()), dict(trained.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"

    keys = metric_keys(str(workdir / "mlflow.db"))
    assert set(REQUIRED) <= keys, set(REQUIRED) - keys
    info = json.loads((workdir / result["last_checkpoint"] / "lsp_checkpoint.json").read_text())
    assert info["step"] == 2 and info["mlflow_run_id"] == result["mlflow_run_id"]
    lines = (workdir / result["run_dir"] / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert {s["step"] for s in samples} == {1, 2}


def test_lsp_zero_logs_no_self_reward(compose_cfg, workdir):
    result = train(compose_cfg("experiment=smoke", "algo=lsp_zero", "trainer.max_steps=1"))
    assert "self_reward/mean" not in result["metrics"]
    assert "solver/reward_mean" in result["metrics"]


def test_resume_continues_at_next_step_with_optimizer_state(compose_cfg, workdir):
    first = train(compose_cfg("experiment=smoke", "trainer.max_steps=1", "run_dir=run"))
    state1 = torch.load(f"{first['last_checkpoint']}/trainer_state.ckpt", weights_only=False)
    assert state1["global_step"] == 1

    # the "killed" run is restarted with resume=true and a later max_steps
    second = train(compose_cfg("experiment=smoke", "trainer.max_steps=3", "run_dir=run",
                               "resume=true"))
    assert second["global_step"] == 3
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # same MLflow run continues
    state3 = torch.load(f"{second['last_checkpoint']}/trainer_state.ckpt", weights_only=False)
    # Adam's step count continued from the restored state (1 + 2 more steps), not from zero.
    adam_steps = {float(s["step"]) for s in state3["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3.0}
    steps = sorted(int(p.name.split("_")[1]) for p in (workdir / "run/checkpoints").glob("step_*"))
    assert steps == [2, 3]  # keep_last=2 pruned step 1


@pytest.mark.parametrize(
    ("override", "key"),
    [("rollout.group_size=1", "rollout.group_size"), ("algo.beta=-1", "algo.beta"),
     ("algo.aggregation=foo", "algo.aggregation"), ("algo.self_reward.mode=x", "self_reward.mode")],
)
def test_config_errors_name_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_cfg("experiment=smoke", override))


def test_missing_model_path_names_the_key(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"model.policy={tmp_path}/nope")
    with pytest.raises(ConfigError, match="model.policy"):
        check_models(cfg)


def test_unknown_group_option_is_one_clear_message(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lsp.train", "algo=nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'algo/nope'" in proc.stderr and "lsp_zero" in proc.stderr


def test_invalid_queries_are_penalized_not_crashing(compose_cfg, workdir):
    cfg = compose_cfg("experiment=smoke", "trainer.max_steps=1")
    with open_dict(cfg):
        cfg.rollout.max_query_chars = 1  # every random query is "too long" -> degenerate
    result = train(cfg)
    assert result["metrics"]["rollout/invalid_queries"] == cfg.rollout.num_queries
    assert result["global_step"] == 1


class FirstQueryInvalid(RolloutHooks):
    """A rollout hook (configured like any callback) that marks query 0 of every step invalid,
    as check_queries would, and keeps the finished batches."""

    batches: list = []

    def on_challenger_rollout_end(self, trainer, module, batch) -> None:
        batch.check.valid[0] = False
        batch.check.reasons[0] = "echo"

    def on_rewards_computed(self, trainer, module, batch) -> None:
        FirstQueryInvalid.batches.append(batch)


@pytest.mark.parametrize("rule", ["penalize", "skip"])
def test_a_mixed_batch_of_valid_and_invalid_queries(compose_cfg, workdir, rule):
    # N = 3 queries, the first invalid: the Solver answers the other two only, and the
    # Challenger's advantages follow the rule (lsp.selfplay.advantages.selfplay_advantages).
    cfg = compose_cfg("experiment=smoke", "trainer.max_steps=1", "rollout.num_queries=3",
                      f"algo.invalid_query={rule}")
    with open_dict(cfg):
        cfg.callbacks["mixed"] = {"_target_": f"{__name__}.FirstQueryInvalid"}
    FirstQueryInvalid.batches.clear()
    result = train(cfg)
    (sp,) = FirstQueryInvalid.batches
    g = cfg.rollout.group_size
    assert result["metrics"]["rollout/invalid_queries"] == 1
    assert sp.solver.sequences.shape[0] == 2 * g and sp.rewards.shape == (2, g)
    r_valid = -sp.rewards.mean(1) + sp.self_rewards.mean(1)  # LSP: -V + V_Q, the valid two
    # the default margin: 1.0 x the population std of the valid Solver rewards R + R_Q
    # (lsp.selfplay.advantages.invalid_margin, tested by hand in tests/test_advantages.py)
    from lsp.selfplay.advantages import invalid_margin

    worst = r_valid.min() - invalid_margin(sp.solver_reward)
    torch.testing.assert_close(sp.challenger_reward, torch.cat([worst[None], r_valid]))
    if rule == "penalize":  # all three in the batch baseline
        mean = (worst + r_valid.sum()) / 3
        expected = torch.cat([(worst - mean)[None], r_valid - mean])
        assert expected[0] < 0  # the invalid query is pushed down
    else:  # the invalid one is out of the baseline, with advantage 0
        expected = torch.cat([torch.zeros(1), r_valid - r_valid.mean()])
    torch.testing.assert_close(sp.challenger_advantages, expected)


@pytest.mark.slow
def test_one_step_on_embedded_smollm2(compose_cfg, workdir):
    # The real embedded model, reduced sizes so CI stays fast: N=2 queries x G=2 answers.
    cfg = compose_cfg("experiment=cpu_smollm", "algo=lsp", "trainer.max_steps=1",
                      "rollout.num_queries=2", "rollout.group_size=2",
                      "rollout.challenger.max_new_tokens=48", "rollout.solver.max_new_tokens=32",
                      "rollout.reject_truncated=false")
    initial = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.policy))
    result = train(cfg)
    m = result["metrics"]
    assert result["global_step"] == 1
    assert m["train/nonfinite_steps"] == 0  # the step was taken, not skipped
    assert math.isfinite(m["loss/total"]) and m["train/grad_norm"] > 0
    assert 0.0 <= m["solver/reward_mean"] <= 9.0  # LLM-judge expected score on 0-9
    assert 0.0 <= m["self_reward/mean"] <= 7.0  # quality rubric expected score on 0-7
    trained = AutoModelForCausalLM.from_pretrained(result["last_checkpoint"])
    after = dict(trained.named_parameters())
    changed = [n for n, p in initial.named_parameters() if not torch.equal(p, after[n])]
    assert len(changed) > len(after) // 2, f"only {len(changed)} of {len(after)} tensors moved"
    print({k: round(v, 3) for k, v in m.items() if k.startswith(("perf/", "solver/", "kl/"))})


def test_grpo_baseline_takes_queries_from_a_prompt_file(compose_cfg, workdir):
    prompts = workdir / "prompts.txt"
    prompts.write_text("Name a colour.\nWrite one word.\nSay hello.\n")
    cfg = compose_cfg("experiment=smoke", "algo=grpo", f"rollout.prompt_file={prompts}",
                      "trainer.max_steps=2")
    result = train(cfg)
    m = result["metrics"]
    assert result["global_step"] == 2
    assert "kl/solver" in m and "kl/challenger" not in m  # no Challenger role
    assert "challenger/reward_mean" not in m and "solver/reward_mean" in m
    lines = (workdir / result["run_dir"] / "samples.jsonl").read_text().splitlines()
    queries = {json.loads(line)["query"] for line in lines}
    assert queries and queries <= set(prompts.read_text().splitlines())


def test_grpo_without_a_prompt_file_is_a_config_error(compose_cfg):
    with pytest.raises(ConfigError, match="rollout.prompt_file"):
        validate(compose_cfg("experiment=smoke", "algo=grpo"))


def test_nonfinite_loss_skips_steps_then_stops_with_a_clear_error(compose_cfg, workdir):
    # An infinite Challenger weight makes every loss/gradient non-finite: steps are skipped and
    # counted, the weights stay as they were, and the third one in a row stops the run.
    cfg = compose_cfg("experiment=smoke", "algo.alpha_ch=inf", "trainer.max_steps=2",
                      "run_dir=nan_run")
    initial = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.policy))
    result = train(cfg)
    assert result["global_step"] == 2 and result["metrics"]["train/nonfinite_steps"] == 2
    after = AutoModelForCausalLM.from_pretrained(result["last_checkpoint"])
    assert all(torch.equal(p, dict(after.named_parameters())[n])
               for n, p in initial.named_parameters())
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        train(compose_cfg("experiment=smoke", "algo.alpha_ch=inf", "trainer.max_steps=5"))


def test_a_prompt_file_with_a_self_play_algo_is_a_config_error(compose_cfg, workdir):
    prompts = workdir / "prompts.txt"
    prompts.write_text("Say hello.\n")
    with pytest.raises(ConfigError, match="algo=lsp plays the Challenger"):
        validate(compose_cfg("experiment=smoke", "algo=lsp", f"rollout.prompt_file={prompts}"))


class KeepBatches(RolloutHooks):
    batches: list = []

    def on_rewards_computed(self, trainer, module, batch) -> None:
        KeepBatches.batches.append(batch)


def test_the_constraint_environment_in_training(compose_cfg, workdir):
    # reward=judge_constraints: every valid query reaches the Solver with k constraints appended
    # (never a held-out type); R = 0.1 * judge + the fraction satisfied, each part logged.
    from lsp.selfplay.constraints import HELD_OUT_TYPES, constraint_score

    cfg = compose_cfg("experiment=smoke", "reward=judge_constraints", "rollout.constraints.k=2",
                      "reward.components.judge.reward.model=tiny:causal", "trainer.max_steps=2")
    with open_dict(cfg):
        cfg.callbacks["keep"] = {"_target_": f"{__name__}.KeepBatches"}
    KeepBatches.batches.clear()
    result = train(cfg)
    g = cfg.rollout.group_size
    for sp in KeepBatches.batches:
        assert len(sp.constraints) == int(sp.check.valid.sum())
        for i, (query, cs) in enumerate(zip(sp.check.valid_queries, sp.constraints, strict=True)):
            assert len(cs) == 2 and not {c.instruction_id for c in cs} & set(HELD_OUT_TYPES)
            assert sp.solver_queries[i].startswith(query.rstrip())
            assert all(c.description in sp.solver.prompts[i * g] for c in cs)
            fractions = torch.tensor([constraint_score(cs, a)
                                      for a in sp.solver.completions[i * g : (i + 1) * g]])
            torch.testing.assert_close(sp.reward_components["constraints"][i], fractions)
        expected = 0.1 * sp.reward_components["judge"] + sp.reward_components["constraints"]
        torch.testing.assert_close(sp.rewards, expected)
    assert {"reward/judge_mean", "reward/constraints_mean"} <= set(result["metrics"])
    # Each step draws new constraints (one seed per step from the torch RNG).
    first, second = (sp.solver_queries for sp in KeepBatches.batches)
    assert first != second


def test_the_checkpoint_callback_runs_after_the_step_records(compose_cfg, tmp_path):
    # A resume continues after the last checkpoint: the step's history row and samples must be
    # on disk before it, or a kill between the two loses them (the random-SIGKILL test).
    from lsp.selfplay.callbacks import HFCheckpoint, MetricsHistory, SampleTable
    from lsp.train import build_callbacks

    callbacks = build_callbacks(compose_cfg("experiment=smoke"), tmp_path)
    kinds = [type(c) for c in callbacks]
    assert kinds[-1] is HFCheckpoint
    assert MetricsHistory in kinds and SampleTable in kinds


def test_reference_prompt_memo_trains_identically(compose_cfg, workdir):
    """`model.reference_prompt_memo` (default on) reuses pi_ref's pass over the Challenger's
    prompt from the second step on, and changes no number: the same seed gives the same rollouts,
    losses, KL and weights with it as without it."""
    import lightning as L

    from lsp.selfplay.data import SelfPlayData
    from lsp.train import build_module

    def three_steps(memo: bool):
        cfg = compose_cfg("experiment=smoke", "trainer.max_steps=3",
                          f"model.reference_prompt_memo={str(memo).lower()}")
        L.seed_everything(cfg.seed)
        module = build_module(cfg, "cpu", None)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=SelfPlayData())
        return module

    kept, plain = three_steps(True), three_steps(False)
    assert kept.prompt_memos["challenger"].hits >= 2 and plain.prompt_memos == {}
    keys = [k for k in plain.last_metrics if k.startswith(("loss/", "kl/"))]
    assert {"loss/challenger", "kl/challenger"} <= set(keys)
    for key in keys:
        assert kept.last_metrics[key] == plain.last_metrics[key], key
    for (name, a), b in zip(kept.policy.state_dict().items(), plain.policy.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
