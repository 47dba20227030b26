"""The KL a reference's dtype alone puts into a step: at step 0 the policy IS the reference, so
every nat of `log pi - log pi_ref` on its own samples is rounding.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_dtype_kl.py [--new-tokens 256] [--json F]

The policy runs as lsp trains it (float32 master weights under the autocast `model.amp: auto`
gives) and samples 16 answers (8 of `make bench`'s prompts x 2, temperature 1, own engine).
Their log-probs are taken under the policy and under two references of the same weights,
`model.reference_dtype` float32 and bfloat16, each under the same autocast (as
`lsp.selfplay.passes.reference_logprobs` runs it). Printed per reference: the per-token
log-ratio's mean, mean |.| and max |.|, and the per-answer k1 sum (what `kl/solver` averages and
the penalty charges) as mean and std over the 16 answers.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_step import PROMPTS, machine  # noqa: E402  (benchmarks/ is the script's folder)

from lsp.chat import render_chat
from lsp.engines.own import generate
from lsp.engines.sampling import SamplingConfig
from lsp.models import amp_dtype, autocast, load_causal_lm, load_tokenizer, resolve_model
from lsp.selfplay.logprobs import completion_logprobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    path = str(resolve_model("embedded:smollm2-135m-instruct"))
    tok, amp = load_tokenizer(path), amp_dtype("auto", "cpu")
    policy = load_causal_lm(path)
    references = {dtype: load_causal_lm(path, dtype) for dtype in ("float32", "bfloat16")}
    torch.manual_seed(0)
    prompts = [render_chat(tok, p) for p in PROMPTS[:8] for _ in range(2)]
    r = generate(policy, tok, prompts, SamplingConfig(max_new_tokens=args.new_tokens), amp)
    real = r.completion_mask.bool()  # (B, C)
    with torch.no_grad(), autocast("cpu", amp):
        def logprobs(model):  # (B, C) float32
            return completion_logprobs(model, r.sequences, r.attention_mask, r.prompt_len).float()
        pol = logprobs(policy)
        ratios = {k: torch.where(real, pol - logprobs(m), 0.0) for k, m in references.items()}
    mach = machine()
    print(f"machine: {mach['cpu']}, amx_bf16={mach['amx_bf16']}, torch {mach['torch']}, "
          f"autocast {amp}; {len(prompts)} answers, {real.sum(-1).float().mean():.0f} tokens on average")
    out = {}
    for k, d in ratios.items():
        seq = d.sum(-1)  # (B,) k1 per answer
        out[k] = {"token_mean": (d.sum() / real.sum()).item(),
                  "token_abs_mean": (d.abs().sum() / real.sum()).item(),
                  "token_abs_max": d.abs().max().item(),
                  "answer_k1_mean": seq.mean().item(), "answer_k1_std": seq.std().item()}
        o = out[k]
        print(f"reference {k}: per token mean {o['token_mean']:.4f}, mean |.| "
              f"{o['token_abs_mean']:.4f}, max |.| {o['token_abs_max']:.3f}; k1 per answer "
              f"{o['answer_k1_mean']:.3f} +- {o['answer_k1_std']:.3f} (mean, std)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "autocast": str(amp), "references": out,
                       "answer_tokens": real.sum(-1).tolist()}, f, indent=1)


if __name__ == "__main__":
    main()
