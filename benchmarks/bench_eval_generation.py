"""Evaluation generation, lsp vs vllm engine, side by side in one process (BENCHMARKS.md):
the embedded model answers the first 32 IFEval prompts (T=0.01, 256 new tokens, bf16) through
`lsp.evaluation.outputs.sample_answers`, the path of AlpacaEval outputs, IFEval and selection.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval_generation.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lsp.evaluation.ifeval import load_prompts
from lsp.evaluation.outputs import GenerationSettings, load_engine, sample_answers
from lsp.models import resolve_model

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "ifeval" / "input_data.jsonl"
RUNS = (("lsp", 8), ("vllm", 32), ("lsp", 8), ("vllm", 32))  # (engine, batch size), alternating


def run(engine: str, batch: int, prompts: list[str], path: str) -> dict:
    settings = GenerationSettings(max_new_tokens=256, batch_size=batch, amp="auto", engine=engine)
    start = time.perf_counter()
    eng, tok = load_engine(path, settings, "cpu")
    loaded = time.perf_counter()
    answers = []
    for i in range(0, len(prompts), batch):
        answers += sample_answers(eng, tok, prompts[i : i + batch], settings)
    took = time.perf_counter() - loaded
    tokens = sum(len(tok(a)["input_ids"]) for a in answers)
    return {"engine": engine, "load_s": round(loaded - start, 1), "gen_s": round(took, 1),
            "answer_tokens": tokens, "tok_per_s": round(tokens / took, 1),
            "truncated": sum(bool(a.truncated) for a in answers)}


def main() -> None:
    prompts = [p["prompt"] for p in load_prompts(IFEVAL)[:32]]
    path = resolve_model("embedded:smollm2-135m-instruct")
    for engine, batch in RUNS:
        print(json.dumps(run(engine, batch, prompts, path)), flush=True)


if __name__ == "__main__":
    main()
