"""DVC stage `report`: the study report (Markdown + PNG plots, pooled.json) -> artifacts/report/,
and the pooled figures per arm -> metrics/pooled/<arm>.json (and metrics/pooled/base.json: the
base in the model card's form), also on one MLflow parent run per arm named after the arm (the
runs' parents are `<arm>-<seed>`)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from lsp import headline
from lsp.errors import exit_on_input_error
from lsp.study.params import (
    evaluate_dir,
    load_params,
    metrics_file,
    run_name,
    select_dir,
    study_logger,
    train_dir,
)
from lsp.study.report import build_report
from lsp.tracking import log_to_existing_run, numeric, publish_figures

OUT = Path("artifacts/report")
PROTOCOL = Path("docs/protocol.md")


def runs(params: DictConfig) -> list[str]:
    """Every arm under every seed, arm by arm: lsp-0, lsp-1, ..., grpo-2."""
    seeds = list(params.get("seeds") or [params.seed])
    return [run_name(arm, seed) for arm in params.arms for seed in seeds]


def publish_pooled(params: DictConfig, stats: dict) -> None:
    """Per arm (and the base) its pooled figures (lsp.headline) -> the DVC metrics file and the
    arm's MLflow parent run (`pooled/<figure>`, with the secondary figures)."""
    for arm, arm_stats in stats["arms"].items():
        logger = study_logger(params, arm, "report")
        publish_figures(headline.pooled_figures(arm_stats), metrics_file("pooled", arm), logger,
                        "pooled")
        if logger is not None:
            log_to_existing_run(logger, logger.parent_run_id,
                                numeric(headline.pooled_extra(arm_stats), "pooled"), 0)
    publish_figures(headline.card_figures(stats["base"]["card"]), metrics_file("pooled", "base"),
                    study_logger(params, "base", "report"), "pooled")


@exit_on_input_error
def main() -> None:
    params = load_params()
    names = runs(params)
    path = build_report({r: train_dir(r) for r in names}, {r: select_dir(r) for r in names},
                        {r: evaluate_dir(r) for r in names}, OUT,
                        f"{params.report.title} ({params.study_name})",
                        ifeval_dir=Path("artifacts/ifeval"), protocol=PROTOCOL,
                        timings_dir=Path("artifacts/timings"))
    publish_pooled(params, json.loads((OUT / "pooled.json").read_text()))
    print(f"report -> {path}")


if __name__ == "__main__":
    main()
