"""Bad input at every kind of entry point: one line `error: ...` naming the key or file, exit
status 2, no traceback (lsp.errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "lsp.train", "experiment=smoke"]
CASES = {
    "negative lr": (TRAIN + ["optim.lr=-0.1"], "optim.lr"),
    "group size not a number": (TRAIN + ["rollout.group_size=abc"], "rollout.group_size"),
    "unknown strategy": (TRAIN + ["trainer.strategy=dpp"], "trainer.strategy"),
    "queries do not divide": (TRAIN + ["trainer.devices=2", "rollout.num_queries=3"],
                              "rollout.num_queries=3"),
    "missing prompt file": (TRAIN + ["algo=grpo", "rollout.prompt_file=nope.jsonl"], "nope.jsonl"),
    "malformed prompt file": (TRAIN + ["algo=grpo", "rollout.prompt_file=bad.jsonl"],
                              "bad.jsonl: malformed JSON at line 2"),
    "missing model": (TRAIN + ["model.policy=/no/such/model"], "model.policy"),
    "unknown key": (TRAIN + ["+foo=bar"], "unknown key 'foo'"),
    "unknown judge key": (["-m", "lsp.evaluate", "+eval.judge.temperature=0"],
                          "eval.judge.temperature: unknown key"),
    "select without its run": (["-m", "lsp.select"], "'run_dir' is missing"),
    "report without its folder": (["-m", "lsp.report", "--root", "nope"], "nope"),
    "malformed params.yaml": ([str(REPO / "pipelines" / "train.py"), "lsp", "0"], "params.yaml"),
    "stage run without its seed": ([str(REPO / "pipelines" / "train.py"), "lsp"], "<arm> <seed>"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_error_exit_2(tmp_path, case):
    args, named = CASES[case]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n{"instruction": \n')
    (tmp_path / "params.yaml").write_text("arms: {lsp: [unclosed\n")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and named in last, last
