"""`python -m lsp.evaluate`: AlpacaEval outputs of a candidate and of the base model, scored by a
judge through alpaca-eval (the paper's protocol: win rate against the base model's own outputs,
overall and per subset, sampling at temperature 0.01), with the judge's sanity report.

Writes into `out_dir`: `details.json` (everything measured), `metrics.json` (the headline
figures, lsp.headline; `metrics_file` puts them elsewhere, as the study does), `sanity.json`,
`model_outputs/<generator>.json`, `vs_<baseline>/annotations.json`; logs to MLflow. Examples:
    python -m lsp.evaluate eval=quick candidate.model=<run_dir>/checkpoints/step_000200
    python -m lsp.evaluate candidate.selection=artifacts/select/selection.json
    python -m lsp.evaluate eval/judge=alpaca_eval_gpt4_turbo 'eval.baselines=[base,reference]'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lsp.errors import exit_on_input_error
from lsp.evaluation.alpaca import evaluate, generate_only
from lsp.evaluation.selection import candidate_model, generator_name

__all__ = ["candidate_model", "evaluate", "generate_only", "generator_name"]


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
