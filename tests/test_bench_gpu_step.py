"""benchmarks/bench_gpu_step.py (issue 10, point 7) runs the paper configuration end to end: checked
here on CPU at the `tiny` size, so the script a GPU session runs is known to work up to the device.
It also trains the paper config's way, with gradient checkpointing, which the shared-prompt
log-prob path must step aside for (lsp.selfplay.logprobs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_step.py"


def test_paper_shaped_step_runs_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--engines", "lsp",
           "--queries", "2", "--group", "2", "--challenger-tokens", "8", "--solver-tokens", "8",
           "--judge-tokens", "8", "--warmup", "1", "--steps", "1", "--cache", str(tmp_path),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    run, summary = result["runs"]["lsp"], result["summary"]["lsp"]
    assert run["gradient_checkpointing"] is True  # the paper config's setting
    assert summary["steps"] == 1
    # 2 queries + 2 x 2 answers of at most 8 tokens each
    assert 0 < summary["generated_tokens"] <= 48
    assert {"challenger_generation", "solver_generation", "self_reward", "reward",
            "reference_logprobs", "forward_backward", "optimizer"} <= set(summary["phases_s"])
    assert "lsp on cpu:" in proc.stdout and "generated tokens/s" in proc.stdout
