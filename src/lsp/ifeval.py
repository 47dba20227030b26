"""`python -m lsp.ifeval [candidate.model=...]`: IFEval for a candidate and the base model.

Writes, for the base and the candidate, <out_dir>/<name>/records.jsonl (per prompt: response,
pass/fail per instruction, strict and loose, truncated), details.json (the four official figures
with SEs, accuracy per instruction type, answers that hit max_new_tokens; for the candidate also the
paired difference against the base with a bootstrap 95% CI and an exact McNemar p-value) and
metrics.json (the headline figures only, lsp.headline; for the candidate `metrics_file` puts
them elsewhere, as the study does). Generation is resumable (<out_dir>/<name>/generations/),
and the figures land in MLflow.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lsp.errors import exit_on_input_error
from lsp.evaluation.ifeval_run import run

__all__ = ["run"]


@hydra.main(config_path="../../conf", config_name="ifeval", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
