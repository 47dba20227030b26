"""The frozen reference's log-prob pass four ways, side by side in one process, on identical
inputs (issue 10, point 6: "the frozen reference held in bf16", and the Challenger's prompt).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_reference.py [--reps 10] [--json F]

Variants, each run under the autocast `model.amp: auto` gives (bf16 where the CPU runs it natively):
- `float32`: the default (`model.reference_dtype: float32`): autocast casts every linear weight to
  bf16 in every forward call, because it caches casts only for weights that require grad;
- `bf16-linear`: the decoder's linear weights stored in bf16 (cast once), embeddings, norms and
  head in float32: under autocast the same products on the same bf16 values, so the log-probs
  must be bit-identical to `float32`'s (the script prints the largest difference);
- `bfloat16`: the whole model in bf16 (`model.reference_dtype: bfloat16`): norms, residual
  stream and head in bf16 too, so its log-probs differ from the autocast policy's (KL at step 0
  no longer 0);
- `float32+memo`: `float32` with the Challenger's prompt pass kept from the previous step
  (`model.reference_prompt_memo`, lsp.selfplay.logprobs.PromptMemo; the default since
  2026-12-06): that prompt is the same every step, so only the first step runs it.

The pass is the reference half of one `make bench` step: the Solver's 16 rows (4 prompts x 4
answers, `bench_lm_head.batch`) and the Challenger's 4 rows of one 295-token prompt with 64 new
tokens, prompt sharing and the fused head on, under no_grad. Variants alternate; the first pass of
each is warm-up; medians over the rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from bench_lm_head import P, batch  # noqa: E402  (benchmarks/ is the script's folder)
from bench_step import machine  # noqa: E402

from lsp.models import amp_dtype, autocast, load_causal_lm, resolve_model
from lsp.selfplay.logprobs import PromptMemo, completion_logprobs
from lsp.selfplay.runtime import configure_cpu_allocator

CH_PROMPT, CH_ROWS, CH_NEW = 295, 4, 64  # the Challenger's pass in `make bench`


def challenger_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 40000, (1, CH_PROMPT), generator=gen).repeat(CH_ROWS, 1)
    seqs = torch.cat([prompt, torch.randint(100, 40000, (CH_ROWS, CH_NEW), generator=gen)], 1)
    return seqs, torch.ones_like(seqs)


def bf16_linear(model: torch.nn.Module) -> int:
    """Store the decoder layers' linear weights in bf16, in place; -> how many weights."""
    n = 0
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data = mod.weight.data.to(torch.bfloat16)
            n += mod.weight.numel()
    return n


def reference_pass(model, batches, amp, memos) -> list[torch.Tensor]:
    # batches: [(sequences, mask, prompt_len)]; memos: a PromptMemo or None per batch
    # -> the (B, C) float32 log-probs of each batch (0 at pads)
    with torch.no_grad(), autocast("cpu", amp):
        return [completion_logprobs(model, s, m, p, share_prefix=True, fused_head=True,
                                    prompt_memo=memo).float()
                for (s, m, p), memo in zip(batches, memos, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="passes per variant (the first: warm-up)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    configure_cpu_allocator()  # as lsp.train does
    path = str(resolve_model("embedded:smollm2-135m-instruct"))
    models = {"float32": load_causal_lm(path)}
    models["bf16-linear"] = copy.deepcopy(models["float32"])
    cast = bf16_linear(models["bf16-linear"])
    models["bfloat16"] = load_causal_lm(path, "bfloat16")
    models["float32+memo"] = models["float32"]
    seqs, mask, _ = batch()
    ch_seqs, ch_mask = challenger_batch()
    batches = [(seqs, mask, P), (ch_seqs, ch_mask, CH_PROMPT)]
    # a memo for the Challenger's batch only, as lsp.selfplay.module passes it
    memos = {k: [None, PromptMemo() if k.endswith("+memo") else None] for k in models}
    amp = amp_dtype("auto", "cpu")
    times: dict[str, list[float]] = {k: [] for k in models}
    outs = {}
    for _ in range(args.reps):
        for name, model in models.items():
            start = time.perf_counter()
            outs[name] = reference_pass(model, batches, amp, memos[name])
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    real = [mask[:, P:].bool(), ch_mask[:, CH_PROMPT:].bool()]
    diff = {k: max(torch.where(r, o - b, 0.0).abs().max().item()
                   for r, o, b in zip(real, outs[k], outs["float32"], strict=True))
            for k in models}
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, amx_bf16={mach['amx_bf16']}, "
          f"torch {mach['torch']}, autocast {amp}; bf16-linear: {cast:,} weights cast")
    for k, v in times.items():
        print(f"{k}: median {med[k]:.3f} s per pass; all: {' '.join(f'{x:.2f}' for x in v)}; "
              f"max |log-prob - float32's|: {diff[k]:.2e}")
    for k in models:
        print(f"float32/{k} time ratio: {med['float32'] / med[k]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "autocast": str(amp), "seconds": times, "median_s": med,
                       "max_logprob_diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
