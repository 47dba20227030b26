"""DVC stage `train@<arm>-<seed>`: training of one study arm under one seed into
artifacts/train/<arm>-<seed>/ (checkpoints/, history.csv for the DVC plots, samples.jsonl,
details.json: the last step's metrics) and metrics/train/<arm>-<seed>.json (the curated DVC
metrics, lsp.headline)."""

from __future__ import annotations

import sys

from lsp import headline
from lsp.errors import exit_on_input_error
from lsp.io import atomic_write_json
from lsp.selfplay.callbacks import read_history
from lsp.study.params import (
    load_params,
    mark_complete,
    metrics_file,
    resume_or_clear,
    run_argv,
    run_name,
    study_logger,
    train_config,
    train_dir,
)
from lsp.study.timings import timed
from lsp.tracking import publish_figures
from lsp.train import train


@exit_on_input_error
@timed(lambda arm, seed: f"train@{arm}-{seed}")
def main(arm: str, seed: int) -> None:
    params = load_params()
    cfg, run = train_config(params, arm, seed), run_name(arm, seed)
    # a DVC rerun after a kill resumes (same config and code); any other rerun starts afresh
    cfg.resume = resume_or_clear(cfg, run)
    cfg.logger = study_logger(params, run, "train", new_parent=not cfg.resume)
    result = train(cfg)
    details = {k: v for k, v in result["metrics"].items()
               if k.split("/")[0] in ("solver", "challenger", "self_reward", "kl", "rollout", "reward")}
    atomic_write_json(train_dir(run) / "details.json", {**details, "global_step": result["global_step"]})
    publish_figures(headline.train_figures(read_history(train_dir(run) / "history.csv")),
                    metrics_file("train", run), cfg.logger, "train")
    mark_complete(run)


if __name__ == "__main__":
    main(*run_argv(sys.argv))
