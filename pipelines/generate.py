"""DVC stage `generate@<arm>-<seed>` / `generate_base@<seed>`: AlpacaEval outputs (temperature
0.01, the run's seed) of a run's selected checkpoint, or of the base model under a seed
-> artifacts/generate/<run>/model_outputs.json (the base's run is `base-<seed>`)."""

from __future__ import annotations

import sys

from lsp.errors import exit_on_input_error
from lsp.evaluation.alpaca import generate_only
from lsp.evaluation.selection import chosen_path
from lsp.study.params import (
    BASE_MODEL,
    eval_config,
    generate_dir,
    load_params,
    run_argv,
    run_name,
    select_dir,
)
from lsp.study.timings import timed


@exit_on_input_error
@timed(lambda arm, seed: f"generate_base@{seed}" if arm == "base" else f"generate@{arm}-{seed}")
def main(arm: str, seed: int) -> None:
    params = load_params()
    run = run_name(arm, seed)
    spec = str(BASE_MODEL) if arm == "base" else chosen_path(select_dir(run) / "selection.json")[0]
    cfg = eval_config(params, run)
    cfg.out_dir = str(generate_dir(run))  # model_outputs/<run>.json beside the store
    outputs = generate_only(cfg, spec, run)
    print(f"{len(outputs)} outputs of {spec} -> {generate_dir(run)}")


if __name__ == "__main__":
    main(*run_argv(sys.argv))
