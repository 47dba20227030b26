"""DVC stage `prompts@<set>` (only with `baselines=grpo`): a training instruction file (JSON, JSONL
or TXT; Alpaca's alpaca_data.json works as is) -> artifacts/prompts/<set>.jsonl, deduplicated and
with every AlpacaEval instruction removed, plus <set>.json with the counts."""

from __future__ import annotations

import json
import sys

from lsp.errors import exit_on_input_error
from lsp.evaluation.outputs import load_eval_set
from lsp.io import atomic_write_text
from lsp.selfplay.prompts import clean_instructions, load_prompt_file
from lsp.study.params import load_params, prompts_path


@exit_on_input_error
def main(name: str) -> None:
    params = load_params()
    source = params.prompt_sets[name].path
    held_out = [r["instruction"] for r in load_eval_set(params.eval.eval_set.path)]
    kept, counts = clean_instructions(load_prompt_file(source), held_out)
    if not kept:
        raise SystemExit(f"prompt set {name}: no instructions left from {source} ({counts})")
    out = prompts_path(name)
    atomic_write_text(out, "".join(json.dumps({"instruction": p}) + "\n" for p in kept))
    atomic_write_text(out.with_suffix(".json"), json.dumps({"source": source, **counts}, indent=2))
    print(f"prompt set {name}: {counts['kept']} instructions from {source} "
          f"({counts['duplicates']} duplicates, {counts['held_out_overlap']} AlpacaEval overlaps dropped)")


if __name__ == "__main__":
    main(sys.argv[1])
