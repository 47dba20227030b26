"""DVC stage `generate@<arm>` / `generate_base`: AlpacaEval outputs (temperature 0.01) of an arm's
selected checkpoint, or of the base model -> artifacts/generate/<name>/model_outputs.json."""

from __future__ import annotations

import sys

from lsp.errors import exit_on_input_error
from lsp.evaluation.alpaca import generate_only
from lsp.evaluation.selection import chosen_path
from lsp.study.params import BASE_MODEL, eval_config, generate_dir, load_params, select_dir


@exit_on_input_error
def main(name: str) -> None:
    params = load_params()
    spec = str(BASE_MODEL) if name == "base" else chosen_path(select_dir(name) / "selection.json")[0]
    cfg = eval_config(params, name)
    cfg.out_dir = str(generate_dir(name))  # model_outputs/<name>.json beside the store
    outputs = generate_only(cfg, spec, name)
    print(f"{len(outputs)} outputs of {spec} -> {generate_dir(name)}")


if __name__ == "__main__":
    main(sys.argv[1])
