"""DVC stage `prompts`: where each arm's queries come from -> artifacts/queries/<arm>.jsonl (+ .json).

- A data arm (`arms.<arm>.queries: <prompt set>`): the set's file (JSON, JSONL or TXT; Alpaca's
  alpaca_data.json works as is), deduplicated and with every instruction that overlaps an
  evaluation set removed (the same text, or a shared run of 8 words, against AlpacaEval and
  IFEval), and `<arm>.json` with the counts and the source.
- A self-play arm (`queries: challenger`): one line holding the Challenger prompt its queries are
  sampled from (rollout.task / rollout.template), so a changed prompt retrains exactly the arms
  that use it.
"""

from __future__ import annotations

import json

from lsp.errors import exit_on_input_error
from lsp.evaluation.ifeval import load_or_download
from lsp.evaluation.outputs import load_eval_set
from lsp.io import atomic_write_text
from lsp.selfplay.prompts import (
    DEFAULT_TASK,
    DEFAULT_TEMPLATE,
    clean_instructions,
    load_prompt_file,
    render_challenger_prompt,
)
from lsp.study.params import CHALLENGER, arm_queries, load_params, queries_path
from lsp.study.timings import timed


def evaluation_texts(params) -> list[str]:
    """Every instruction of the two evaluation sets: never a training query."""
    alpaca = [r["instruction"] for r in load_eval_set(params.eval.eval_set.path)]
    return alpaca + [p["prompt"] for p in load_or_download(params.ifeval.path)]


def prompt_set(params, name: str, held_out: list[str]) -> tuple[list[dict], dict]:
    source = params.prompt_sets[name].path
    kept, counts = clean_instructions(load_prompt_file(source), held_out)
    if not kept:
        raise SystemExit(f"prompt set {name}: no instructions left from {source} ({counts})")
    print(f"prompt set {name}: {counts['kept']} instructions from {source} ({counts['duplicates']} "
          f"duplicates, {counts['held_out_overlap']} AlpacaEval/IFEval overlaps dropped)")
    return [{"instruction": p} for p in kept], {"source": source, **counts}


def challenger(params) -> tuple[list[dict], dict]:
    r = params.rollout
    prompt = render_challenger_prompt(r.task or DEFAULT_TASK, r.template or DEFAULT_TEMPLATE)
    return [{"challenger_prompt": prompt}], {"source": CHALLENGER}


@exit_on_input_error
@timed(lambda: "prompts")
def main() -> None:
    params = load_params()
    held_out = None
    for arm in params.arms:
        queries = arm_queries(params, arm)
        if queries == CHALLENGER:
            rows, info = challenger(params)
        else:
            held_out = held_out if held_out is not None else evaluation_texts(params)
            rows, info = prompt_set(params, queries, held_out)
        out = queries_path(arm)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
