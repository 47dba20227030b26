"""DVC stage `ifeval_base@<seed>` / `ifeval@<arm>-<seed>`: IFEval answers and figures of the base
model under a seed (`base-<seed>`), or of a run's selected checkpoint with its paired difference
against the base of the same seed -> artifacts/ifeval/<run>/{details.json, records.jsonl,
generations/} and metrics/ifeval/<run>.json (the headline figures: DVC metrics)."""

from __future__ import annotations

import sys
from pathlib import Path

from lsp.chat import set_chat_date
from lsp.errors import exit_on_input_error
from lsp.evaluation import ifeval as ife
from lsp.evaluation.ifeval_run import evaluate_model, format_table, log_details, write_metrics
from lsp.evaluation.selection import candidate_model
from lsp.study.params import (
    ifeval_config,
    ifeval_dir,
    load_params,
    metrics_file,
    run_argv,
    run_name,
    study_logger,
)
from lsp.study.timings import timed


@exit_on_input_error
@timed(lambda arm, seed: f"ifeval_base@{seed}" if arm == "base" else f"ifeval@{arm}-{seed}")
def main(arm: str, seed: int) -> None:
    params = load_params()
    name = run_name(arm, seed)
    cfg = ifeval_config(params, name)
    cfg.logger = study_logger(params, name, "ifeval")
    set_chat_date(cfg.model.chat_date)
    prompts = ife.load_or_download(cfg.ifeval.path)[: cfg.ifeval.limit or None]
    spec = cfg.base.model if arm == "base" else candidate_model(cfg)[0]
    folder = ifeval_dir(name)
    records = evaluate_model(cfg, prompts, spec, name, folder)
    base = None if arm == "base" else ife.read_records(ifeval_dir(cfg.base.name) / "records.jsonl")
    details = write_metrics(cfg, folder, spec, records, base, metrics_file("ifeval", name))
    print(format_table({name: details}))
    log_details(cfg, name, details, Path(folder))


if __name__ == "__main__":
    main(*run_argv(sys.argv))
