"""Seconds per step at 1 process and at 2 data-parallel processes (`ddp`, `fsdp`), same machine,
one run after the other, alternating: `python -m lsp.train` as a user runs it, the median of
`perf/step_s` over the steps after the first (history.csv; the first carries warm-up).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_processes.py [smoke|cpu_smollm|cpu_smollm_vllm ...]

Every layout plays the same global batch (rollout.num_queries), so a ratio is the speed-up of
one step. `cpu_smollm` runs the embedded experiment with the `lsp` engine, `cpu_smollm_vllm` with
its default `vllm` engine (one engine per rank). Results: results/processes_<cpu>.json.
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
    "smoke": (["experiment=smoke", "rollout.num_queries=4", "rollout.group_size=4"], 6),
    "cpu_smollm": (["experiment=cpu_smollm", "rollout.challenger.engine=lsp",
                    "rollout.solver.engine=lsp"], 4),
    "cpu_smollm_vllm": (["experiment=cpu_smollm"], 4),
}
LAYOUTS = {"1": (1, "auto"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}  # name -> (processes, strategy)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run(experiment: str, layout: str, root: Path) -> dict:
    overrides, steps = SETTINGS[experiment]
    devices, strategy = LAYOUTS[layout]
    run_dir = root / f"{experiment}-{layout}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "lsp.train", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
           f"trainer.devices={devices}", f"trainer.strategy={strategy}",
           "callbacks.checkpoint.every_n_steps=1000", *overrides]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    # a fresh parent per run: its children's peak RSS is this run's largest process (a rank)
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, env=env, cwd=root,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_gb = int(out.stdout.strip().splitlines()[-1]) / 2**20  # ru_maxrss: KiB on Linux
    return {"experiment": experiment, "layout": layout, "devices": devices, "wall_s": wall,
            "peak_rss_gb_largest_process": peak_gb, **step_figures(run_dir)}


def step_figures(run_dir: Path) -> dict:
    """Steps after the first: median s/step, and generated tokens per second over them (a step's
    work varies with the rollouts' lengths, and the layouts sample different rollouts)."""
    rows = read_history(run_dir / "history.csv")[1:]
    steps_s = [r["perf/step_s"] for r in rows]
    tokens = sum(r["perf/generated_tokens"] for r in rows)
    return {"median_step_s": statistics.median(steps_s), "steps_s": steps_s,
            "tokens_per_s": tokens / sum(steps_s)}


def main(experiments: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    results = []
    for experiment in experiments:
        for layout in [*LAYOUTS, *LAYOUTS]:  # alternating: drift on the machine hits all
            results.append(run(experiment, layout, root))
            r = results[-1]
            print(f"{experiment:15s} {layout:4s}: median {r['median_step_s']:.2f} s/step, "
                  f"{r['tokens_per_s']:.0f} generated tok/s, peak RSS "
                  f"{r['peak_rss_gb_largest_process']:.2f} GB (steps "
                  f"{', '.join(f'{s:.2f}' for s in r['steps_s'])})", flush=True)
    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores")
    for experiment in experiments:
        mine = [r for r in results if r["experiment"] == experiment]
        med = {layout: statistics.median(r["median_step_s"] for r in mine if r["layout"] == layout)
               for layout in LAYOUTS}
        tok = {layout: statistics.median(r["tokens_per_s"] for r in mine if r["layout"] == layout)
               for layout in LAYOUTS}
        print(f"{experiment}: s/step 1 process {med['1']:.2f}, 2 ddp {med['ddp']:.2f}, 2 fsdp "
              f"{med['fsdp']:.2f}; generated tok/s 1 process {tok['1']:.0f}, 2 ddp "
              f"{tok['ddp']:.0f} ({tok['ddp'] / tok['1']:.2f}x), 2 fsdp {tok['fsdp']:.0f} "
              f"({tok['fsdp'] / tok['1']:.2f}x)")
    slug = "_".join(cpu.lower().replace("(r)", "").split()[:3])
    out = Path(__file__).parent / "results" / f"processes_{slug}.json"
    out.write_text(json.dumps({"machine": cpu, "cores": os.cpu_count(), "runs": results},
                              indent=2))


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
