"""The fused LM head (`model.fused_lm_head`, lsp.selfplay.lm_head) against the model's own head,
on identical inputs, side by side in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_lm_head.py [--reps 6] [--json F]

One Solver-shaped learning pass as `make bench` makes it: the embedded SmolLM2-135M-Instruct,
16 rows = 4 prompts x 4 answers sharing their prompt (94 tokens, some rows left-padded), answers
of 20-64 tokens (right-padded to 64), float32 weights under `--amp` (default auto, as
`model.amp`: bf16 autocast where the CPU runs bf16 natively, else float32), prompt sharing on: the
frozen reference's log-probs (no grad), then the policy's log-probs, a KL-regularised
policy-gradient surrogate and its backward. The inputs are fixed (seeded random tokens), so both
variants do exactly the same work, unlike in `make bench`, where the rollouts drift apart after
the first update. The variants alternate (fused, plain, fused, ...); the first pass of each is
warm-up; medians over the rest. Also prints the largest log-prob difference and the gradient
cosine between the two, as a check that they compute the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from bench_step import machine  # noqa: E402  (benchmarks/ is the script's folder)

from lsp.models import amp_dtype, load_causal_lm, resolve_model
from lsp.selfplay.logprobs import completion_logprobs
from lsp.selfplay.runtime import configure_cpu_allocator

B, P, C, GROUP = 16, 94, 64, 4


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (B // GROUP, P), generator=gen).repeat_interleave(GROUP, 0)
    seqs = torch.cat([prompts, torch.randint(100, 40000, (B, C), generator=gen)], 1)
    mask = torch.ones_like(seqs)
    for i in range(B // GROUP):
        mask[i * GROUP : (i + 1) * GROUP, : 2 * i] = 0  # the prompts' left padding
    lengths = torch.randint(20, C + 1, (B,), generator=gen)
    lengths[0] = C
    for b in range(B):
        mask[b, P + lengths[b] :] = 0
    return seqs, mask, torch.randn(B, generator=gen)


def learning_pass(policy, ref, seqs, mask, adv, fused: bool, amp: torch.dtype | None = None):
    # -> the policy's (B, C) log-probs (real tokens; 0 at pads) and its flat gradient
    real = mask[:, P:].bool()
    with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
        with torch.no_grad():
            ref_lp = completion_logprobs(ref, seqs, mask, P, fused_head=fused).float()
        lp = completion_logprobs(policy, seqs, mask, P, fused_head=fused).float()
    loss = torch.where(real, lp * adv[:, None] - 0.05 * (lp - ref_lp), 0.0).sum()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad(set_to_none=True)
    return torch.where(real, lp.detach(), 0.0), grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6, help="passes per variant (the first: warm-up)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bfloat16", "none"],
                    help="autocast, as model.amp (auto: bf16 where the CPU runs it natively)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    configure_cpu_allocator()  # as lsp.train does
    path = str(resolve_model("embedded:smollm2-135m-instruct"))
    policy, ref = load_causal_lm(path, trainable=True), load_causal_lm(path)
    seqs, mask, adv = batch()
    amp = amp_dtype(args.amp, "cpu")
    times, outs = {"fused": [], "plain": []}, {}
    for _ in range(args.reps):
        for name in times:
            start = time.perf_counter()
            outs[name] = learning_pass(policy, ref, seqs, mask, adv, name == "fused", amp)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    diff = (outs["fused"][0] - outs["plain"][0]).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(  # float64: 134M terms
        outs["fused"][1].double(), outs["plain"][1].double(), dim=0).item()
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, amx_bf16={mach['amx_bf16']}, "
          f"torch {mach['torch']}, autocast {amp}")
    for k, v in times.items():
        print(f"{k}: median {med[k]:.3f} s per pass; all: {' '.join(f'{x:.2f}' for x in v)}")
    print(f"plain/fused time ratio: {med['plain'] / med['fused']:.2f}")
    print(f"max |log-prob difference|: {diff:.2e}; gradient cosine: {cos:.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "autocast": str(amp), "seconds": times, "median_s": med,
                       "max_logprob_diff": diff, "grad_cosine": cos}, f, indent=1)


if __name__ == "__main__":
    main()
