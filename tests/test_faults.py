"""Fault injection (issue 13): judge output fuzz and non-finite values in a real training step."""

from __future__ import annotations

import math
import random

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lsp.selfplay.prompts import QUALITY_MAX_SCORE, parse_quality_score
from lsp.selfplay.records import RewardOutput
from lsp.selfplay.rewards import quality_scores

pytestmark = pytest.mark.faults


# ---- judge output fuzz ----------------------------------------------------------------------------
def fuzz_outputs(n: int, seed: int = 0) -> list[str]:
    """n judge outputs of the kinds that break parsers: empty, huge, unicode, out-of-range and
    non-numeric numbers, several <Score> tags, text imitating the prompt's own tags."""
    rng = random.Random(seed)
    numbers = ["-1", "8", "99", "3.5", "1e308", "nan", "inf", "7.0", "0", "5", "9" * 400, "-0"]
    pieces = ["<Score>", "</Score>", "<Calculation>", "</Calculation>", "<Justification>",
              "Score:", "=", "+", "1", "0", "\u202e", "\U0001f600", "\u0301", "\x00", "\n",
              "<Score><Score>", "The response", "Instruction:", "</s>", "<|im_end|>", " "]
    out = ["", " ", "\n" * 1000, "x" * 200_000, "<Score>" * 5000, "<Calculation>" + "1+" * 5000]
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:  # several score tags, in or out of range
            out.append(" ".join(f"<Score>{rng.choice(numbers)}</Score>"
                                for _ in range(rng.randint(1, 4))))
        elif kind == 1:  # a calculation, valid or not
            terms = [rng.choice(["0", "1", "2", "x", "-1"]) for _ in range(rng.randint(0, 9))]
            tail = rng.choice(["", f" = {rng.choice(numbers)}", " ="])
            out.append(f"<Calculation>{' + '.join(terms)}{tail}</Calculation>")
        else:  # random soup of tags, numbers and unicode
            out.append("".join(rng.choice(pieces + numbers) for _ in range(rng.randint(1, 60))))
    return out[:n]


def test_judge_output_fuzz_never_crashes_and_counts_fallbacks():
    """1,000 outputs through the self-reward's parsing and fallback (`quality_scores`, what
    QualitySelfReward's generate mode runs on the judge's texts): no exception, every value
    finite and in [0, 7], `parse_failed` exactly where `parse_quality_score` found no score in
    range, and the documented fallback (group_mean: mean of the parsed rows, one group here) on
    those rows."""
    texts = fuzz_outputs(1000)
    out = quality_scores(texts, QUALITY_MAX_SCORE, "group_mean")
    assert isinstance(out, RewardOutput) and out.values.shape == (1000,)
    assert torch.isfinite(out.values).all()
    assert ((out.values >= 0) & (out.values <= QUALITY_MAX_SCORE)).all()
    expected = [parse_quality_score(t) for t in texts]
    failed = torch.tensor([s is None for s in expected])
    assert torch.equal(out.parse_failed, failed)
    assert 100 < int(failed.sum()) < 900  # the fuzz hits both sides
    parsed_mean = sum(s for s in expected if s is not None) / int((~failed).sum())
    assert out.values[failed].unique().tolist() == pytest.approx([parsed_mean])
    for score in expected:  # out-of-range and non-integer numbers never pass
        assert score is None or (isinstance(score, int) and 0 <= score <= QUALITY_MAX_SCORE)
    assert parse_quality_score("<Score>3</Score> <Score>9</Score>") is None  # the last tag counts
    assert parse_quality_score("<Score>9</Score> <Score>3</Score>") == 3


@pytest.mark.parametrize("fallback", ["group_mean", "midpoint", "zero"])
def test_judge_fallback_when_nothing_parses(fallback):
    out = quality_scores(["", "no score", "<Score>99"], QUALITY_MAX_SCORE, fallback)
    assert out.parse_failed.all()
    expected = {"group_mean": 3.5, "midpoint": 3.5, "zero": 0.0}[fallback]  # documented values
    assert out.values.tolist() == [expected] * 3


# ---- non-finite values in a training step ---------------------------------------------------------
class NaNReward:
    """Wraps the configured reward and turns one of its values into NaN or inf."""

    def __init__(self, inner, value: float):
        self.inner, self.value = inner, value

    def score(self, instructions, responses, **kw):
        out = self.inner.score(instructions, responses, **kw)
        values = out.values.clone()
        values[0] = self.value
        return RewardOutput(values, out.parse_failed, out.raw)


class InjectAtStep2(Callback):
    """Before step 2 (step 1 was clean, so Adam has state): snapshot the weights and the
    optimiser state, then apply the fault."""

    def __init__(self, inject):
        self.inject, self.before, self.state = inject, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step != 1:
            return
        self.before = {k: v.clone() for k, v in module.policy.state_dict().items()}
        opt = trainer.optimizers[0]
        self.state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
        self.inject(module)


def two_steps_with(cfg, inject):
    from lsp.selfplay.data import SelfPlayData
    from lsp.train import build_module, build_trainer, run_directory

    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, run_dir)
    probe = InjectAtStep2(inject)
    trainer.callbacks.append(probe)
    module = build_module(cfg, "cpu", None)
    trainer.fit(module, datamodule=SelfPlayData())
    return probe, module, trainer.optimizers[0]


@pytest.mark.parametrize("where", ["reward_nan", "reward_inf", "self_reward_nan", "reference_nan"])
def test_nonfinite_step_is_skipped_and_counted(compose_cfg, workdir, where):
    cfg = compose_cfg("experiment=smoke", "trainer.max_steps=2", "run_dir=run")

    def inject(module):
        if where.startswith("reward"):
            value = math.nan if where == "reward_nan" else math.inf
            module.frozen["reward"] = NaNReward(module.frozen["reward"], value)
        elif where == "self_reward_nan":
            module.frozen["self_reward"] = NaNReward(module.frozen["self_reward"], math.nan)
        else:  # the reference model's log-probs
            ref = module.frozen["reference"]

            def nan_logits(mod, args, output):
                output.logits.fill_(math.nan)
                return output

            ref.register_forward_hook(nan_logits)
        # every query valid, so the Solver (and the reward) always runs
        module.settings.max_query_chars = 10**6

    probe, module, opt = two_steps_with(cfg, inject)
    assert module.last_metrics["train/nonfinite_steps"] == 1.0  # step 2 skipped, counted
    assert probe.before is not None and probe.state  # step 1 was clean and built Adam's state
    after = module.policy.state_dict()
    for k, v in probe.before.items():
        assert torch.equal(v, after[k]), k  # weights untouched
    assert probe.state.keys() == opt.state.keys()
    for p, state in probe.state.items():
        for name, value in state.items():
            assert torch.equal(value, opt.state[p][name]), name  # Adam state untouched


# ---- SIGKILL at random moments ------------------------------------------------------------------
def _history(path) -> dict[int, dict]:
    import csv

    with open(path) as f:  # the last row of each step (a resumed run appends again)
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    return {s: {k: v for k, v in r.items() if not k.startswith("perf/")} for s, r in rows.items()}


def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    """An 8-step smoke run with a checkpoint every step, SIGKILLed 10 times (alternately while a
    checkpoint is being written and at a random moment after a step) and resumed each time:
    it finishes; every checkpoint on disk is complete and loads; history.csv and the MLflow
    metrics equal those of an uninterrupted run, step for step; one MLflow run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from lsp.io import CHECKPOINT_MARKER as MARKER

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    # 16 steps: room for 10 kills however fast a machine runs the steps (at 8, a fast 2-core AMD
    # EPYC finished the run after 8 kills in 2 of 3 tries)
    steps = 16
    cmd = [sys.executable, "-m", "lsp.train", "experiment=smoke", f"trainer.max_steps={steps}",
           "callbacks.checkpoint.every_n_steps=1", "callbacks.checkpoint.keep_last=2"]

    def start(run_dir: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([*cmd, f"run_dir={run_dir}", *extra], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight = start("straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]

    ckpts = tmp_path / "killed" / "checkpoints"
    rng = random.Random(0)
    kills, moments = 0, []
    while True:
        proc = start("killed", "resume=true")
        seen = {p.name for p in ckpts.glob("step_*")} if ckpts.exists() else set()
        during_write = kills % 2 == 0
        killed = False
        while proc.poll() is None and kills < 10:
            tmp = list(ckpts.glob(".tmp-step_*")) if ckpts.exists() else []
            new = {p.name for p in ckpts.glob("step_*")} - seen if ckpts.exists() else set()
            if (during_write and tmp) or (not during_write and new):
                if not during_write:
                    time.sleep(rng.uniform(0.0, 1.0))  # somewhere in the next step
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                moments.append("checkpoint write" if during_write else "random")
                killed = True
                break
            time.sleep(0.005)
        if not killed:
            assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
            break
    assert kills == 10 and moments.count("checkpoint write") == 5

    for ckpt in ckpts.glob("step_*"):  # complete: marker, weights, trainer state all load
        assert (ckpt / MARKER).exists()
        json.loads((ckpt / MARKER).read_text())
        assert torch.load(ckpt / "trainer_state.ckpt", weights_only=False)["global_step"] > 0
        from safetensors.torch import load_file

        assert load_file(ckpt / "model.safetensors")
    assert not list(ckpts.glob(".tmp-step_*"))

    a = _history(tmp_path / "straight" / "history.csv")
    b = _history(tmp_path / "killed" / "history.csv")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert a == b  # every metric of every step, exactly

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lsp")
    runs = {r.data.params["run_dir"]: r for r in client.search_runs([exp.experiment_id])}
    assert len(runs) == 2  # one run each: the kills did not orphan runs
    for key in ("solver/reward_mean", "loss/total", "kl/challenger"):
        ref = {m.step: m.value for m in client.get_metric_history(runs["straight"].info.run_id, key)}
        got = client.get_metric_history(runs["killed"].info.run_id, key)
        assert {m.step for m in got} == set(ref)
        assert all(m.value == pytest.approx(ref[m.step], rel=1e-6, abs=1e-9) for m in got), key


# ---- MLflow server outage -------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(root, port: int):
    """A real `mlflow server` on loopback (its own process group, so that a stop stops it all),
    over a SQLite store that outlives it."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server_artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": ""})
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def _stop(proc) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_mlflow_server_outage_queues_metrics_and_training_continues(tmp_path):
    """A real `mlflow server` is killed after step 3 of a 12-step smoke run and restarted 4 steps
    later: training never stops, no checkpoint is lost, and once the server is back every step's
    metrics (queued meanwhile) and sample tables are in the same MLflow run, each at its step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from lsp.io import CHECKPOINT_MARKER as MARKER

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    history = tmp_path / "run" / "history.csv"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": uri}
    train = subprocess.Popen(
        [sys.executable, "-m", "lsp.train", "experiment=smoke", "trainer.max_steps=12",
         "run_dir=run", "callbacks.checkpoint.every_n_steps=2", "callbacks.checkpoint.keep_last=20",
         "callbacks.sample_table.every_n_steps=2", "logger.retry_every_s=0"],
        cwd=tmp_path, env=env, stdout=(tmp_path / "train.log").open("w"),
        stderr=subprocess.STDOUT)  # a file: a full pipe would block the run

    def steps() -> int:
        return len(_history(history)) if history.exists() else 0

    try:
        while steps() < 3 and train.poll() is None:
            time.sleep(0.05)
        _stop(server)  # the outage
        down_at = steps()
        while steps() < down_at + 4 and train.poll() is None:
            time.sleep(0.05)
        train.send_signal(signal.SIGSTOP)  # hold training while the server restarts (~20 s)
        up_at = steps()
        server = _mlflow_server(tmp_path, port)
        train.send_signal(signal.SIGCONT)
        code = train.wait(timeout=900)
        err = (tmp_path / "train.log").read_text()  # Hydra's log handler writes to stdout
        assert code == 0, err[-3000:]
    finally:
        train.kill()
        _stop(server) if server.poll() is None else None
    assert up_at < 12, "training ended before the server came back: lengthen the run"
    assert "does not answer" in err and "answers again" in err, err[-3000:]

    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{s:06d}" for s in range(2, 13, 2)]
    assert all((c / MARKER).exists() for c in ckpts)
    local = _history(history)
    assert sorted(local) == list(range(1, 13))

    server = _mlflow_server(tmp_path, port)  # read back what the store holds
    try:
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("lsp").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("solver/reward_mean", "kl/challenger"):
            got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert sorted(got) == list(range(1, 13)), key  # the outage's steps were queued
            assert all(got[s] == pytest.approx(float(local[s][key]), rel=1e-5) for s in got)
        tables = {f.path for f in client.list_artifacts(run.info.run_id, "samples")}
        assert {f"samples/step_{s:06d}.json" for s in range(2, 13, 2)} <= tables
    finally:
        _stop(server)


# ---- unwritable or full output folder, corrupt inputs -------------------------------------------
def test_a_run_dir_that_cannot_be_written_fails_before_training(compose_cfg, workdir):
    from lsp.train import RunDirError, train

    (workdir / "afile").write_text("not a folder")
    with pytest.raises(RunDirError, match="run_dir=afile/run: cannot write there"):
        train(compose_cfg("experiment=smoke", "run_dir=afile/run"))


def test_too_little_free_space_fails_before_step_1(compose_cfg, workdir, monkeypatch):
    import shutil
    from collections import namedtuple

    from lsp.train import RunDirError, train

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**5))  # 100 kB
    with pytest.raises(RunDirError, match=r"0\.00 GiB free, but the 2 checkpoints"):
        train(compose_cfg("experiment=smoke", "run_dir=run", "trainer.max_steps=2",
                          "callbacks.checkpoint.every_n_steps=1", "callbacks.checkpoint.keep_last=1"))
    assert not list((workdir / "run").glob("checkpoints/step_*"))  # nothing trained


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(compose_cfg, workdir, monkeypatch):
    """The disk fills up while step 2's checkpoint is written (ENOSPC from the weight file):
    one clear error naming the step; step 1's checkpoint is intact and the run resumes from it."""
    import errno

    from transformers import PreTrainedModel

    from lsp.io import CheckpointWriteError, check_checkpoint
    from lsp.train import train

    save = PreTrainedModel.save_pretrained
    calls = []

    def fills_up(self, folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            save(self, folder, *args, **kwargs)  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_up)
    overrides = ["experiment=smoke", "run_dir=run", "callbacks.checkpoint.every_n_steps=1"]
    with pytest.raises(CheckpointWriteError, match=r"step 2: .*No space left on device.*"
                                                   r"\(step_000001\) is intact"):
        train(compose_cfg(*overrides, "trainer.max_steps=3"))
    ckpts = workdir / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_000001"]  # no half folder left
    check_checkpoint(ckpts / "step_000001")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    assert train(compose_cfg(*overrides, "trainer.max_steps=3", "resume=true"))["global_step"] == 3


@pytest.mark.parametrize("damage", ["weights", "trainer_state", "marker"])
def test_resuming_from_a_truncated_checkpoint_names_the_file(compose_cfg, workdir, damage):
    from lsp.io import CorruptCheckpointError
    from lsp.train import train

    overrides = ["experiment=smoke", "run_dir=run", "callbacks.checkpoint.every_n_steps=1"]
    train(compose_cfg(*overrides, "trainer.max_steps=2"))
    last = workdir / "run" / "checkpoints" / "step_000002"
    file = last / {"weights": "model.safetensors", "trainer_state": "trainer_state.ckpt",
                   "marker": "lsp_checkpoint.json"}[damage]
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptCheckpointError, match=rf"{file.name}: corrupt") as err:
        train(compose_cfg(*overrides, "trainer.max_steps=3", "resume=true"))
    assert str(file.relative_to(workdir)) in str(err.value) and "\n" not in str(err.value)
    if damage != "marker":
        assert "delete run/checkpoints/step_000002 to resume from step_000001" in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    ('[{"instruction": "a", "dataset": "koala"}, {"dataset": "koala"}]',
     "record 1 lacks the string fields ['instruction']"),
    ('[{"instruction": "a", "dataset": "koala"}, "b"]', "record 1 lacks the string fields"),
    ('{"instruction": "a"}', "expected a non-empty JSON list"),
    ('[{"instruction": "a", "dataset": "koala"},', "not valid JSON"),
])
def test_an_alpacaeval_file_with_missing_fields_names_the_file(tmp_path, content, message):
    from lsp.evaluation.outputs import EvalSetUnavailableError, load_eval_set

    path = tmp_path / "set.json"
    path.write_text(content)
    with pytest.raises(EvalSetUnavailableError, match="set.json") as err:
        load_eval_set(path)
    assert message in str(err.value)


def test_sigkill_while_blocked_in_mlflow_logging_resumes_exactly(tmp_path):
    """The run is SIGKILLed while an MLflow call hangs (the real server is frozen with SIGSTOP
    after step 3, so the next logging call waits on its socket), then resumed once the server is
    back: its history.csv and MLflow metrics equal those of an uninterrupted run, one MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": uri,
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "600"}  # a frozen server: the call hangs
    cmd = [sys.executable, "-m", "lsp.train", "experiment=smoke", "trainer.max_steps=6",
           "callbacks.checkpoint.every_n_steps=1", "callbacks.checkpoint.keep_last=2"]

    def start(run_dir: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([*cmd, f"run_dir={run_dir}", *extra], cwd=tmp_path, env=env,
                                stdout=(tmp_path / f"{run_dir}.log").open("a"),
                                stderr=subprocess.STDOUT)

    def steps(run_dir: str) -> int:
        path = tmp_path / run_dir / "history.csv"
        return len(_history(path)) if path.exists() else 0

    try:
        assert start("straight").wait(timeout=600) == 0
        proc = start("killed")
        while steps("killed") < 3 and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGSTOP)  # frozen: connections open, no answer
        seen, since = steps("killed"), time.monotonic()
        while time.monotonic() - since < 8:  # a smoke step takes ~1.5 s: it is blocked
            assert steps("killed") <= seen + 1 and proc.poll() is None
            time.sleep(0.2)
        blocked_at = steps("killed")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.killpg(server.pid, signal.SIGCONT)
        assert start("killed", "resume=true").wait(timeout=600) == 0
        assert blocked_at < 6

        a, b = _history(tmp_path / "straight" / "history.csv"), _history(tmp_path / "killed" / "history.csv")
        assert sorted(a) == sorted(b) == list(range(1, 7)) and a == b
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("lsp")
        runs = {r.data.params["run_dir"]: r for r in client.search_runs([exp.experiment_id])}
        assert len(runs) == 2  # the kill did not orphan a run
        for key in ("solver/reward_mean", "kl/challenger"):
            ref = {m.step: m.value for m in client.get_metric_history(runs["straight"].info.run_id, key)}
            got = client.get_metric_history(runs["killed"].info.run_id, key)
            assert {m.step for m in got} == set(ref) == set(range(1, 7)), key
            assert all(m.value == pytest.approx(ref[m.step], rel=1e-6, abs=1e-9) for m in got), key
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        _stop(server)
