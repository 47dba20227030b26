"""The CPU prefill budget (lsp.engines, rollout.vllm.cpu_prefill_tokens), side by side in one
process: two vLLM engines over the embedded model, one with the default budget (16,384 tokens:
the 64-prompt call in one group), one with vLLM's own CPU default (4,096: the batch split
into groups that fit), answering the first 64 IFEval prompts in one call (T=0.01, seeded,
256 new tokens), alternating A, B, A, B.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_cpu_prefill.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from lsp.chat import render_chat
from lsp.engines.sampling import SamplingConfig
from lsp.engines.vllm import VLLMEngine, VLLMSettings, _groups
from lsp.evaluation.ifeval import load_prompts
from lsp.models import load_tokenizer, resolve_model

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "ifeval" / "input_data.jsonl"


def main() -> None:
    path = str(resolve_model("embedded:smollm2-135m-instruct"))
    tok = load_tokenizer(path)
    prompts = [render_chat(tok, p["prompt"]) for p in load_prompts(IFEVAL)[:64]]
    batches = [prompts]  # one call of 64 prompts (about 6k prompt tokens with the template)
    eos = [tok.eos_token_id]
    engines = {b: VLLMEngine(path, tok, eos, "cpu", "bfloat16", VLLMSettings(cpu_prefill_tokens=b))
               for b in (16384, 4096)}
    sampling = SamplingConfig(max_new_tokens=256, temperature=0.01)
    rows = []
    for rep in range(2):
        for budget, engine in engines.items():
            torch.manual_seed(rep)
            start, tokens, groups = time.perf_counter(), 0, 0
            for batch in batches:
                lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in batch]
                groups += len(_groups(lengths, engine.prefill_budget))
                r = engine.generate(batch, sampling)
                tokens += int(r.completion_mask.sum())
            took = time.perf_counter() - start
            rows.append({"budget": budget, "rep": rep, "groups": groups, "gen_s": round(took, 1),
                         "tokens": tokens, "tok_per_s": round(tokens / took, 1)})
            print(json.dumps(rows[-1]), flush=True)
    by = {b: sorted(r["tok_per_s"] for r in rows if r["budget"] == b) for b in engines}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"tokens/s, budget 16384 vs 4096 (grouped): {by[16384]} vs {by[4096]}; "
          f"ratio of means {sum(by[16384]) / sum(by[4096]):.2f}")


if __name__ == "__main__":
    main()
