"""The typed config schema (lsp.config): every shipped config passes; a bad type, range, choice
or unknown key anywhere (target nodes included) is one line naming the key."""

from __future__ import annotations

import itertools

import pytest

from lsp.config import ConfigError, validate

EXPERIMENTS = ["experiment=smoke", "experiment=cpu_smollm", "experiment=paper_llama3b"]
REWARDS = ["reward=llm_judge", "reward=skywork", "reward=tiny_rm", "reward=length",
           "reward=constraints", "reward=judge_constraints"]
ALGOS = ["algo=lsp", "algo=lsp_zero", "algo=grpo rollout.prompt_file=conf/prompts/grpo_example.jsonl"]


@pytest.mark.parametrize(("experiment", "choice"),
                         list(itertools.product(EXPERIMENTS, REWARDS + ALGOS)))
def test_every_shipped_train_config_is_valid(compose_cfg, experiment, choice):
    validate(compose_cfg(experiment, *choice.split()))


@pytest.mark.parametrize("judge", ["local_hf", "alpaca_eval_gpt4_turbo", "openai_compatible"])
def test_every_shipped_evaluate_config_is_valid(compose_cfg, judge):
    validate(compose_cfg(f"eval/judge={judge}", config_name="evaluate"), "evaluate")
    validate(compose_cfg("eval=quick", f"eval/judge={judge}", config_name="evaluate"), "evaluate")


def test_shipped_select_and_ifeval_configs_are_valid(compose_cfg):
    validate(compose_cfg("run_dir=somewhere", config_name="select"), "select")
    validate(compose_cfg(config_name="ifeval"), "ifeval")


TRAIN_CASES = {
    # top level and sections: pydantic's schema
    "+foo=bar": "unknown key 'foo': nothing reads it (keys of the top level: model,",
    "+rollout.solver.tempreature=1": "unknown key 'rollout.solver.tempreature'",
    "rollout.num_queries=1.5": "rollout.num_queries=1.5: Input should be a valid integer",
    "model.dtype=float64": "model.dtype='float64': expected one of ['float32', 'bfloat16']",
    "trainer.max_nonfinite_steps=-1": "trainer.max_nonfinite_steps=-1: must be >= 0",
    "rollout.vllm.gpu_memory_utilization=1.5": "rollout.vllm.gpu_memory_utilization=1.5",
    "trainer.accelerator=tpu": "trainer.accelerator='tpu': expected one of",
    "model.share_prefix=maybe": "model.share_prefix='maybe': Input should be a valid boolean",
    # target nodes: the target's signature
    "+reward.foo=1": "reward.foo: unknown key for lsp.selfplay.rewards.SequenceClassifierReward (its parameters: model,",
    "reward.batch_size=abc": "reward.batch_size='abc': Input should be a valid integer",
    "algo.self_reward.mode=x": "algo.self_reward.mode='x': Input should be 'logits' or 'generate'",
    "algo.self_reward.enabled=perhaps": "algo.self_reward.enabled='perhaps'",
    "+callbacks.checkpoint.every=3": "callbacks.checkpoint.every: unknown key for lsp.selfplay.callbacks.HFCheckpoint",
    "+optim.momentum=0.9": "optim.momentum: unknown key for torch.optim.AdamW",
    "optim._target_=torch.optim.Nope": "optim._target_='torch.optim.Nope': cannot be imported",
    "~reward.model": "reward.model: missing: lsp.selfplay.rewards.SequenceClassifierReward needs it",
    "+trainer.strategies.ddp.bogus=1": "trainer.strategies.ddp.bogus: unknown key for lsp.selfplay.distributed.SelfPlayDDP",
    "trainer.devices=abc": "trainer.devices='abc': expected a count >= 1, -1, 'auto'",
    "device=gpu0": "device='gpu0': expected auto, cpu, cuda, cuda:<index> or mps",
    "callbacks.checkpoint.every_n_steps=0": "callbacks.checkpoint.every_n_steps=0: must be >= 1",
    "reward.batch_size=0": "reward.batch_size=0: must be >= 1",
    "optim.betas=[2,3]": "torch.optim.AdamW' refuses its settings: Invalid beta parameter",
    "trainer.grad_clip=0": "trainer.grad_clip=0: must be > 0",
    "rollout.vllm.kv_cache_gb=0": "rollout.vllm.kv_cache_gb=0: must be > 0 (GiB)",
    "trainer.cpu_allocator=tcmalloc": "trainer.cpu_allocator='tcmalloc': expected one of ['heap', 'keep', 'system']",
}


@pytest.mark.parametrize("override", list(TRAIN_CASES))
def test_a_bad_train_key_is_one_line_naming_it(compose_cfg, override):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=smoke", override))
    message = str(err.value)
    assert TRAIN_CASES[override] in message and "\n" not in message, message


def test_a_nested_component_of_a_composite_reward_is_checked(compose_cfg):
    cfg = compose_cfg("experiment=smoke", "reward=judge_constraints",
                      "+reward.components.judge.reward.bogus=1")
    with pytest.raises(ConfigError, match="reward.components.judge.reward.bogus: unknown key for "
                                          "lsp.selfplay.rewards.LLMJudgeReward"):
        validate(cfg)


@pytest.mark.parametrize(("name", "override", "message"), [
    ("select", "generation.temperature=0", "generation.temperature=0: must be > 0"),
    ("select", "+generation.top_k=5", "unknown key 'generation.top_k'"),
    ("evaluate", "eval.baselines=[base,foo]", "eval.baselines.1='foo': expected one of"),
    ("evaluate", "eval.judge.decision=vote", "eval.judge.decision='vote': Input should be"),
    ("evaluate", "+eval.judge.temperature=0", "eval.judge.temperature: unknown key for "
                                              "lsp.evaluation.judge.LocalHFJudge"),
    ("ifeval", "ifeval.limit=0", "ifeval.limit=0: must be >= 1"),
    ("ifeval", "+ifeval.max_tokens=5", "unknown key 'ifeval.max_tokens'"),
])
def test_a_bad_key_of_select_evaluate_ifeval_is_one_line(compose_cfg, name, override, message):
    overrides = [override] + (["run_dir=x"] if name == "select" else [])
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides, config_name=name), name)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_missing_mandatory_value_is_named(compose_cfg):
    with pytest.raises(ConfigError, match="'run_dir' is missing"):
        validate(compose_cfg(config_name="select"), "select")
