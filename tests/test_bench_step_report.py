"""benchmarks/bench_step.py's report (`make bench`, issue 10): the ratio lines in the issue's form
and the verdict on its targets, computed from a hand-made summary (no benchmark is run here)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def system(samples_per_s: float, rss: float) -> dict:
    return {"steps": 9, "step_s": 16 / samples_per_s, "solver_samples_per_s": samples_per_s,
            "solver_tokens_per_s": 0.0, "tokens_per_s": 0.0, "solver_tokens": 0.0,
            "prompt_tokens": 0.0, "peak_rss_mb": rss, "page_faults_k": 0.0, "phases_s": {}}


def summary() -> dict:
    return {"trl-bf16": system(1.0, 9000.0), "trl-vllm": system(1.2, 10000.0),
            "lsp": system(2.9, 7000.0), "lsp-grpo": system(4.5, 9500.0)}


def test_targets_judge_each_lsp_system_against_each_peer(bench):
    lines = bench.target_lines(summary())
    assert lines[0] == "targets (Solver samples/s >= 3x trl-bf16, 1.5x trl-vllm; peak RSS <= the peer's):"
    # lsp: 2.9 / 1.0 = 2.90x (under 3x); 2.9 / 1.2 = 2.42x; RSS 7000/9000, 7000/10000
    assert lines[2] == ("  lsp (TRL's work plus the Challenger's): trl-bf16 2.90x, RSS 0.78: NOT met; "
                        "trl-vllm 2.42x, RSS 0.70: met")
    # lsp-grpo: 4.50x and 3.75x, but RSS 9500/9000 = 1.06 over TRL bf16's
    assert lines[1] == ("  lsp-grpo (TRL's work exactly): trl-bf16 4.50x, RSS 1.06: NOT met; "
                        "trl-vllm 3.75x, RSS 0.95: met")
    assert len(lines) == 3


def test_targets_need_a_peer_and_an_lsp_system(bench):
    s = summary()
    assert bench.target_lines({"lsp": s["lsp"], "lsp-own": s["lsp"]}) == []
    assert bench.target_lines({"trl-bf16": s["trl-bf16"], "lsp-vllm": s["lsp"]}) == []
    only_bf16 = bench.target_lines({"trl-bf16": s["trl-bf16"], "lsp-grpo": s["lsp-grpo"]})
    assert only_bf16[0].startswith("targets (Solver samples/s >= 3x trl-bf16; ")


def test_report_prints_the_issues_ratio_lines_and_the_verdict(bench):
    mach = {"cpu": "test CPU", "cores": 2, "torch_threads": 2, "avx512_bf16": True,
            "amx_bf16": False, "onednn_bf16": True, "torch": "2.13.0+cpu"}
    args = argparse.Namespace(rounds=3, warmup=2, steps=3)
    text = bench.report(summary(), mach, (0.1, 1.0), args)
    assert "lsp/trl-bf16 solver samples/s ratio: 2.90 (peak RSS lsp/trl-bf16: 0.78)" in text
    assert "lsp/trl-vllm solver samples/s ratio: 2.42 (peak RSS lsp/trl-vllm: 0.70)" in text
    assert "lsp-grpo/lsp solver samples/s ratio: 1.55" in text
    assert "  lsp-grpo (TRL's work exactly): trl-bf16 4.50x" in text
