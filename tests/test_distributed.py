"""Data-parallel self-play (lsp.selfplay.distributed) on CPU with gloo and 2 real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lsp.config import ConfigError, validate
from lsp.io import list_checkpoints
from lsp.selfplay.callbacks import read_history
from lsp.selfplay.distributed import SelfPlayDDP, merge_batches, rank_rows, rank_seed
from lsp.selfplay.fsdp import SelfPlayFSDP, full_weights, is_sharded, shard
from lsp.selfplay.records import QueryCheck, Rollout, SelfPlayBatch
from lsp.train import build_strategy, check_world

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run to completion; a hang (ranks waiting in mismatched collectives) fails after
    `timeout` with the whole process group killed, workers included."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ---- the update equals the 1-process update --------------------------------------------------
@pytest.mark.parametrize(("scenario", "strategy", "micro_batch"), [
    ("one_rank_invalid", "ddp", "1"), ("mixed", "ddp", "1"), ("one_rank_invalid", "fsdp", "1"),
    ("mixed", "fsdp", "1"), ("one_rank_invalid", "fsdp", "2"), ("mixed", "fsdp", "2")])
def test_two_process_step_equals_one_process_step(tmp_path, scenario, strategy, micro_batch):
    """Same global rollouts (injected), 1 vs 2 gloo processes: the same parameter update to 1e-5
    relative, and the same logged metrics. `one_rank_invalid`: rank 1's two queries are both
    degenerate, so it has no Solver rows and makes fewer backward calls than rank 0 (under fsdp it
    runs dummy passes instead, or the ranks would hang in mismatched collectives). Micro-batch 2:
    a query's two answers share a micro-batch, where share_prefix would make two forwards (one
    on a rank whose rows share no prompt): fsdp must make one per micro-batch on every rank."""
    script = str(REPO / "tests" / "distributed_step.py")
    run([script, scenario, str(tmp_path / "one.pt"), "ddp", micro_batch], tmp_path)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
         scenario, str(tmp_path / "two.pt"), strategy, micro_batch], tmp_path, timeout=150)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    norm = sum((v**2).sum() for v in one.values()).sqrt()
    diff = sum(((one[k] - two[k]) ** 2).sum() for k in one).sqrt()
    assert norm > 1e-3  # the step changed the weights
    assert diff / norm < 1e-5
    m1 = json.loads((tmp_path / "one.json").read_text())
    m2 = json.loads((tmp_path / "two.json").read_text())
    for key, value in m1.items():
        if not key.startswith("perf/"):
            assert m2[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    invalid = {"one_rank_invalid": 2.0, "mixed": 1.0}[scenario]
    assert m1["rollout/invalid_queries"] == invalid and m1["loss/solver"] != 0


# ---- a CLI run with 2 processes, checkpoint and resume ----------------------------------------
def train_cli(cwd: Path, run_dir: Path, *extra: str, strategy: str = "ddp"):
    return run(["-m", "lsp.train", "experiment=smoke", "trainer.devices=2",
                f"trainer.strategy={strategy}", "rollout.num_queries=4", f"run_dir={run_dir}",
                *extra], cwd)


def test_two_process_cli_run_resumes_exactly(tmp_path):
    """`python -m lsp.train experiment=smoke trainer.devices=2 trainer.strategy=ddp`, as the
    README runs it: stopped after step 2 and resumed to step 3, it gives one MLflow run, one
    history row per step, and the same step 3 as an uninterrupted 3-step run (each rank's RNG
    stream is restored); the two ranks sample different queries."""
    import mlflow

    train_cli(tmp_path, tmp_path / "straight", "trainer.max_steps=3")
    train_cli(tmp_path, tmp_path / "resumed", "trainer.max_steps=2")
    train_cli(tmp_path, tmp_path / "resumed", "trainer.max_steps=3", "resume=true")

    resumed = read_history(tmp_path / "resumed" / "history.csv")
    straight = read_history(tmp_path / "straight" / "history.csv")
    lines = (tmp_path / "resumed" / "history.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in lines] == ["1", "2", "3"]  # no duplicate rows
    for key in ("solver/reward_mean", "loss/total", "kl/solver", "challenger/reward_mean"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-4, abs=1e-6), key
    steps = [json.loads((p / "lsp_checkpoint.json").read_text())["step"]
             for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")]
    assert steps[-1] == 3
    assert not list((tmp_path / "resumed" / "checkpoints").glob(".tmp-*"))

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    resumed_runs = {r.info.run_id for r in runs
                    if r.data.params.get("run_dir") == str(tmp_path / "resumed")}
    assert len(runs) == 2 and len(resumed_runs) == 1
    history = client.get_metric_history(resumed_runs.pop(), "loss/total")
    assert sorted(m.step for m in history) == [1, 2, 3]

    rows = [json.loads(x) for x in (tmp_path / "straight" / "samples.jsonl").read_text().splitlines()]
    first = {r["query_id"]: r["query"] for r in rows if r["step"] == 1}
    assert len(first) == 4  # the global batch: both ranks' queries
    assert [first[0], first[1]] != [first[2], first[3]]  # rank 0's share vs rank 1's


def test_two_process_fsdp_run_resumes_exactly(tmp_path):
    """`trainer.strategy=fsdp` from the CLI: the checkpoint holds full weights that load with
    from_pretrained (LlamaForCausalLM, not FSDP's wrapper class), and a run stopped after step 2
    and resumed to step 3 ends with the same weights as an uninterrupted 3-step run. Step 3's
    AdamW update depends on the moments saved at step 2, so a sharded optimiser state that was
    not restored (or restored to the wrong parameters) shows up in the weights."""
    from safetensors.torch import load_file

    from lsp.models import load_causal_lm

    train_cli(tmp_path, tmp_path / "straight", "trainer.max_steps=3", strategy="fsdp")
    train_cli(tmp_path, tmp_path / "resumed", "trainer.max_steps=2", strategy="fsdp")
    train_cli(tmp_path, tmp_path / "resumed", "trainer.max_steps=3", "resume=true",
              strategy="fsdp")
    ckpt = {name: tmp_path / name / "checkpoints" / "step_000003" for name in ("straight", "resumed")}
    straight, resumed = (load_file(ckpt[n] / "model.safetensors") for n in ("straight", "resumed"))
    before = load_file(tmp_path / "straight" / "checkpoints" / "step_000002" / "model.safetensors")
    assert max((straight[k] - before[k]).abs().max() for k in straight) > 1e-5  # step 3 moved
    assert max((straight[k] - resumed[k]).abs().max() for k in straight) < 1e-6
    lines = (tmp_path / "resumed" / "history.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in lines] == ["1", "2", "3"]
    config = json.loads((ckpt["resumed"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = load_causal_lm(str(ckpt["resumed"]))
    assert torch.equal(model.state_dict()["model.norm.weight"], resumed["model.norm.weight"])


# ---- pieces -------------------------------------------------------------------------------------
def test_rank_seed():
    assert rank_seed(7, 0) == 7  # one process: the run's seed, unchanged
    seeds = {rank_seed(7, r) for r in range(8)}
    assert len(seeds) == 8
    assert rank_seed(0, 1) != rank_seed(1, 0) and rank_seed(0, 1) != 1  # not seed + rank


def _rollout(rows: int, prompt_len: int, width: int) -> Rollout:
    seq = torch.arange(rows * (prompt_len + width)).view(rows, -1)
    return Rollout(seq, torch.ones_like(seq), prompt_len, torch.ones(rows, width, dtype=torch.long),
                   [f"p{i}" for i in range(rows)], [f"c{i}" for i in range(rows)],
                   torch.zeros(rows, dtype=torch.bool))


def test_merge_batches_orders_ranks_and_skips_absent_solvers():
    g = 2
    a = SelfPlayBatch(step=3, challenger=_rollout(2, 3, 4),
                      check=QueryCheck(["q0", "q1"], torch.tensor([True, True]), ["", ""]),
                      solver=_rollout(4, 5, 2), rewards=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                      reward_components={"c": torch.ones(2, g)}, judge_failures=1)
    b = SelfPlayBatch(step=3, challenger=_rollout(2, 4, 6),
                      check=QueryCheck(["", "  "], torch.tensor([False, False]),
                                       ["empty", "empty"]), judge_failures=0)
    full = merge_batches([a, b], pad_id=0)
    assert full.check.queries == ["q0", "q1", "", "  "]
    assert full.check.valid.tolist() == [True, True, False, False]
    assert full.challenger.sequences.shape == (4, 4 + 6)  # re-padded to the widest
    assert full.challenger.completion_mask.sum(1).tolist() == [4, 4, 6, 6]
    assert full.solver.sequences.shape[0] == 4 and full.rewards.tolist() == [[1, 2], [3, 4]]
    assert full.reward_components["c"].shape == (2, g) and full.judge_failures == 1
    assert rank_rows([a, b], 0) == (slice(0, 2), slice(0, 2))
    assert rank_rows([a, b], 1) == (slice(2, 4), slice(2, 2))
    assert merge_batches([a], 0) is a


def test_world_checks(compose_cfg):
    cfg = compose_cfg("experiment=smoke", "rollout.num_queries=3")
    with pytest.raises(ConfigError, match="rollout.num_queries=3 .* divide by the 2"):
        check_world(cfg, 2)
    check_world(cfg, 1)
    cfg = compose_cfg("experiment=cpu_smollm")
    with pytest.raises(ConfigError, match="engine=vllm with 2 GPU processes"):
        check_world(cfg, 2, "cuda:1")
    check_world(cfg, 2, "cpu")  # CPU: one engine per rank (tests/test_engines.py runs it)
    with pytest.raises(ConfigError, match="trainer.strategy='dpp'.*expected one of"):
        validate(compose_cfg("experiment=smoke", "trainer.strategy=dpp"))
    with pytest.raises(ConfigError, match="trainer.precision"):
        validate(compose_cfg("experiment=smoke", "trainer.precision=16-mixed"))


def test_strategy_from_config(compose_cfg):
    t = compose_cfg("experiment=smoke").trainer
    assert build_strategy(t, "cpu") == "auto"  # one process: Lightning's single device
    t2 = OmegaConf.merge(t, {"devices": 2})
    assert isinstance(build_strategy(t2, "cpu"), SelfPlayDDP)  # auto with 2 devices: ours
    t3 = OmegaConf.merge(t, {"strategy": "ddp", "num_nodes": 2})
    assert isinstance(build_strategy(t3, "cpu"), SelfPlayDDP)
    t4 = OmegaConf.merge(t, {"strategy": "fsdp", "devices": 2})
    fsdp = build_strategy(t4, "cpu")
    assert isinstance(fsdp, SelfPlayFSDP) and fsdp.reshard_after_forward is True


def test_shard_refuses_a_model_without_blocks_and_full_weights_is_a_no_op_unsharded():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="_no_split_modules"):
        shard(model)
    with full_weights(model):  # not sharded: nothing to gather, no process group needed
        assert not is_sharded(model)
