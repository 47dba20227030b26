"""DVC stage `score@<arm>`: the arm's selected checkpoint against the base model on AlpacaEval,
judged through alpaca-eval (win rates overall and per subset, judge sanity report)
-> artifacts/evaluate/<arm>/metrics.json. Reads the generate stages' outputs (nothing regenerated)."""

from __future__ import annotations

import sys

from lsp.errors import exit_on_input_error
from lsp.evaluate import evaluate
from lsp.evaluation.selection import chosen_path
from lsp.study import eval_config, load_params, select_dir


@exit_on_input_error
def main(arm: str) -> None:
    cfg = eval_config(load_params(), arm)
    cfg.candidate.model = chosen_path(select_dir(arm) / "selection.json")[0]
    evaluate(cfg)


if __name__ == "__main__":
    main(sys.argv[1])
