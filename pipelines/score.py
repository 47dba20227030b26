"""DVC stage `score@<arm>-<seed>`: the run's selected checkpoint against the base model sampled
under the same seed (`base-<seed>`) on AlpacaEval, judged through alpaca-eval (win rates overall
and per subset, judge sanity report) -> artifacts/evaluate/<arm>-<seed>/details.json,
metrics/alpaca_eval/<arm>-<seed>.json (the win rates: DVC metrics). Reads the generate stages'
outputs (nothing regenerated)."""

from __future__ import annotations

import sys

from lsp.errors import exit_on_input_error
from lsp.evaluation.alpaca import evaluate
from lsp.evaluation.selection import chosen_path
from lsp.study.params import (
    eval_config,
    load_params,
    metrics_file,
    run_argv,
    run_name,
    select_dir,
    study_logger,
)
from lsp.study.timings import timed


@exit_on_input_error
@timed(lambda arm, seed: f"score@{arm}-{seed}")
def main(arm: str, seed: int) -> None:
    params = load_params()
    run = run_name(arm, seed)
    cfg = eval_config(params, run)
    cfg.logger = study_logger(params, run, "alpaca_eval")
    cfg.metrics_file = str(metrics_file("alpaca_eval", run))
    cfg.candidate.model = chosen_path(select_dir(run) / "selection.json")[0]
    evaluate(cfg)


if __name__ == "__main__":
    main(*run_argv(sys.argv))
