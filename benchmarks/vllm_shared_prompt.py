"""Does vLLM prefill the Challenger's one prompt once or once per sample? Its N samples go to
the engine together as N requests with the same prompt (`lsp.engines.vllm.VLLMEngine.generate`).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vllm_shared_prompt.py [--reps 4] [--json F]

The engine is lsp's own CPU vLLM engine (`rollout.vllm` defaults, bf16) over the embedded
SmolLM2-135M-Instruct; the prompt is the default Challenger prompt under the chat template. Per
repetition, with the prefix cache emptied first (as every weight push empties it), alternating:
4 samples of 64 tokens submitted together ("together"), and the same after a 1-token request
that puts the prompt in the cache first ("primed"). Printed: each request's cached prompt
tokens (vLLM's `num_cached_tokens`) and the seconds per call, medians over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_step import machine  # noqa: E402  (benchmarks/ is the script's folder)

from lsp.chat import render_chat
from lsp.engines import VLLMEngine, VLLMSettings
from lsp.models import load_tokenizer, resolve_model
from lsp.selfplay.prompts import render_challenger_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    from vllm import SamplingParams

    path = str(resolve_model("embedded:smollm2-135m-instruct"))
    tok = load_tokenizer(path)
    engine = VLLMEngine(path, tok, [tok.eos_token_id], "cpu", "bfloat16", VLLMSettings())
    ids = tok(render_chat(tok, render_challenger_prompt()), add_special_tokens=False)["input_ids"]
    request = {"prompt_token_ids": ids}

    def call(primed: bool) -> tuple[float, list[int]]:
        engine.llm.reset_prefix_cache()
        start = time.perf_counter()
        if primed:
            engine.llm.generate([request], [SamplingParams(max_tokens=1, temperature=0.0)],
                                use_tqdm=False)
        params = [SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=i,
                                 logprobs=0) for i in range(args.samples)]
        outs = engine.llm.generate([request] * args.samples, params, use_tqdm=False)
        return time.perf_counter() - start, [o.num_cached_tokens for o in outs]

    call(False)  # warm-up
    runs: dict[str, list[float]] = {"together": [], "primed": []}
    cached = {}
    for _ in range(args.reps):
        for name in runs:
            seconds, cached[name] = call(name == "primed")
            runs[name].append(seconds)
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, amx_bf16={mach['amx_bf16']}; prompt "
          f"{len(ids)} tokens, {args.samples} samples x {args.new_tokens} tokens")
    for name, times in runs.items():
        print(f"{name}: cached prompt tokens per request {cached[name]}; median "
              f"{statistics.median(times):.3f} s; all: {' '.join(f'{t:.3f}' for t in times)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "prompt_tokens": len(ids), "seconds": runs,
                       "cached_tokens": cached}, f, indent=1)


if __name__ == "__main__":
    main()
