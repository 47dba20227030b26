"""DVC stage `select@<arm>-<seed>`: choose the run's checkpoint by the mean training reward of its
Solver answers on the project's own validation prompts (their constraints drawn with the study's
fixed `seed`, the same for every run) -> artifacts/select/<arm>-<seed>/selection.json and
metrics/select/<arm>-<seed>.json (the chosen step and its reward: DVC metrics).
(Not named select.py: a script's folder comes first on sys.path and would shadow stdlib select.)"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from lsp.errors import exit_on_input_error
from lsp.evaluation.selection import select
from lsp.study.params import (
    load_params,
    metrics_file,
    run_argv,
    run_name,
    select_dir,
    study_logger,
    train_config,
    train_dir,
)
from lsp.study.timings import timed


@exit_on_input_error
@timed(lambda arm, seed: f"select@{arm}-{seed}")
def main(arm: str, seed: int) -> None:
    params = load_params()
    run = run_name(arm, seed)
    trained = train_config(params, arm, seed)  # the same (prepared) model and reward the run trained with
    cfg = OmegaConf.create({
        "model": trained.model, "reward": trained.reward, "logger": study_logger(params, run, "select"),
        "run_dir": str(train_dir(run)), "out_dir": str(select_dir(run)),
        "metrics_file": str(metrics_file("select", run)), "reward_from_run": False,
        "validation_prompts": None, "include_base": params.select.include_base,
        "generation": params.select.generation, "device": params.device, "seed": params.seed,
    })
    select(cfg)


if __name__ == "__main__":
    main(*run_argv(sys.argv))
