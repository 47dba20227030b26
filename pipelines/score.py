"""DVC stage `score@<arm>`: the arm's selected checkpoint against the base model on AlpacaEval,
judged through alpaca-eval (win rates overall and per subset, judge sanity report)
-> artifacts/evaluate/<arm>/details.json, metrics/alpaca_eval/<arm>.json (the win rates: DVC
metrics). Reads the generate stages' outputs (nothing regenerated)."""

from __future__ import annotations

import sys

from lsp.errors import exit_on_input_error
from lsp.evaluation.alpaca import evaluate
from lsp.evaluation.selection import chosen_path
from lsp.study.params import eval_config, load_params, metrics_file, select_dir, study_logger


@exit_on_input_error
def main(arm: str) -> None:
    params = load_params()
    cfg = eval_config(params, arm)
    cfg.logger = study_logger(params, arm, "alpaca_eval")
    cfg.metrics_file = str(metrics_file("alpaca_eval", arm))
    cfg.candidate.model = chosen_path(select_dir(arm) / "selection.json")[0]
    evaluate(cfg)


if __name__ == "__main__":
    main(sys.argv[1])
