"""Seconds per step at 1 and at 2 data-parallel processes (lsp.selfplay.distributed), same machine, one
run after the other, alternating: `python -m lsp.train` as a user runs it, the median of
`perf/step_s` over the steps after the first (history.csv; the first carries warm-up).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_processes.py [smoke|cpu_smollm ...]

Both process counts play the same global batch (rollout.num_queries), so the ratio is the
speed-up of one step. The embedded experiment runs with the `lsp` engine at both counts: the
`vllm` engine does not run with several processes yet (README, "Several processes").
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsp.selfplay.callbacks import read_history

SETTINGS = {  # experiment -> (overrides, steps)
    "smoke": (["rollout.num_queries=4", "rollout.group_size=4"], 6),
    "cpu_smollm": (["rollout.challenger.engine=lsp", "rollout.solver.engine=lsp"], 4),
}


def run(experiment: str, devices: int, root: Path) -> dict:
    overrides, steps = SETTINGS[experiment]
    run_dir = root / f"{experiment}-{devices}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "lsp.train", f"experiment={experiment}", f"run_dir={run_dir}",
           f"trainer.max_steps={steps}", f"trainer.devices={devices}", "trainer.strategy=ddp",
           "callbacks.checkpoint.every_n_steps=1000", *overrides]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=root, capture_output=True)
    wall = time.perf_counter() - start
    steps_s = [r["perf/step_s"] for r in read_history(run_dir / "history.csv")][1:]
    return {"experiment": experiment, "devices": devices, "median_step_s": statistics.median(steps_s),
            "steps_s": steps_s, "wall_s": wall}


def main(experiments: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    results = []
    for experiment in experiments:
        for devices in (1, 2, 1, 2):  # alternating: drift on the machine hits both
            results.append(run(experiment, devices, root))
            r = results[-1]
            print(f"{experiment:11s} {devices} process(es): median {r['median_step_s']:.2f} s/step "
                  f"(steps {', '.join(f'{s:.2f}' for s in r['steps_s'])})", flush=True)
    for experiment in experiments:
        one = statistics.median(r["median_step_s"] for r in results
                                if r["experiment"] == experiment and r["devices"] == 1)
        two = statistics.median(r["median_step_s"] for r in results
                                if r["experiment"] == experiment and r["devices"] == 2)
        print(f"{experiment}: 1 process {one:.2f} s/step, 2 processes {two:.2f} s/step, "
              f"speed-up {one / two:.2f}x")
    out = Path(__file__).parent / "results" / "processes.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "cores": os.cpu_count(), "runs": results}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
