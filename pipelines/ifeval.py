"""DVC stage `ifeval_base` / `ifeval@<arm>`: IFEval answers and figures of the base model, or of an
arm's selected checkpoint with its paired difference against the base
-> artifacts/ifeval/<name>/{metrics.json (DVC metrics), details.json, records.jsonl, generations/}."""

from __future__ import annotations

import sys
from pathlib import Path

from lsp.chat import set_chat_date
from lsp.errors import exit_on_input_error
from lsp.evaluate import candidate_model
from lsp.evaluation import ifeval as ife
from lsp.ifeval import evaluate_model, format_table, log_details, write_metrics
from lsp.study import ifeval_config, ifeval_dir, load_params


@exit_on_input_error
def main(name: str) -> None:
    cfg = ifeval_config(load_params(), name)
    set_chat_date(cfg.model.chat_date)
    prompts = ife.load_or_download(cfg.ifeval.path)[: cfg.ifeval.limit or None]
    spec = cfg.base.model if name == "base" else candidate_model(cfg)[0]
    folder = ifeval_dir(name)
    records = evaluate_model(cfg, prompts, spec, name, folder)
    base = None if name == "base" else ife.read_records(ifeval_dir("base") / "records.jsonl")
    details = write_metrics(cfg, folder, spec, records, base)
    print(format_table({name: details}))
    log_details(cfg, name, details, Path(folder))


if __name__ == "__main__":
    main(sys.argv[1])
