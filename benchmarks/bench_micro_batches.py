"""The policy's training pass with micro-batches in row order vs grouped by completion length
(`trainer.group_by_length`), side by side in one process, on identical inputs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_micro_batches.py [--reps 6] [--json F]

Grouping applies where a pass does not share prompts: with gradient checkpointing, as the paper
config trains (`model.gradient_checkpointing: true`), the shared-prompt path steps aside and every
row runs in full. So the policy here is the embedded SmolLM2 with gradient checkpointing, under
the autocast `model.amp: auto` gives, micro-batches of 4 (the paper config's). The inputs are one
real Solver rollout, sampled once by the policy itself (own engine, temperature 1): TRL's 16
prompts of `make bench`, 4 drawn, 4 answers each, up to `--new-tokens` (256) tokens, so the
answers end where the model ends them. Both orders run `lsp.selfplay.passes.backward_role` on it,
alternating; the first pass of each is warm-up; medians over the rest. Also printed: the token
columns each order computes (rows x the micro-batch's longest real completion, summed), the
work grouping removes, and how far each order's bf16 gradient is from the float32 one (row order,
no autocast): another partition rounds each micro-batch's bf16 weight gradient otherwise, so the
two orders differ by more than float32 would; the question is whether either is less accurate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from bench_step import PROMPTS, machine  # noqa: E402  (benchmarks/ is the script's folder)

from lsp.chat import render_chat
from lsp.engines.own import generate
from lsp.engines.sampling import SamplingConfig
from lsp.models import amp_dtype, load_causal_lm, load_tokenizer, resolve_model
from lsp.selfplay.losses import role_counts
from lsp.selfplay.module import SelfPlaySettings
from lsp.selfplay.passes import RolePass, backward_role, reference_logprobs, role_batches
from lsp.selfplay.runtime import configure_cpu_allocator


def columns(rollout, batches) -> int:
    """Completion token columns the micro-batches compute: rows x their longest completion."""
    lengths = rollout.completion_mask.sum(-1)
    return sum(int(lengths[mb].numel()) * int(lengths[mb].max()) for mb in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6, help="passes per order (the first: warm-up)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    configure_cpu_allocator()  # as lsp.train does
    path = str(resolve_model("embedded:smollm2-135m-instruct"))
    tok, amp = load_tokenizer(path), amp_dtype("auto", "cpu")
    policy = load_causal_lm(path, trainable=True)
    reference = load_causal_lm(path)
    torch.manual_seed(0)
    prompts = [render_chat(tok, PROMPTS[i]) for i in torch.randperm(len(PROMPTS))[:4] for _ in range(4)]
    policy.eval()
    rollout = generate(policy, tok, prompts, SamplingConfig(max_new_tokens=args.new_tokens), amp)
    policy.gradient_checkpointing_enable()
    policy.train()
    device = torch.device("cpu")
    advantages = torch.randn(rollout.sequences.shape[0])  # (B,)
    role = RolePass(rollout, advantages, 1.0, 1.0, role_counts(rollout))
    settings = {name: SelfPlaySettings(micro_batch_size=args.micro_batch, group_by_length=group,
                                       amp_dtype=amp)
                for name, group in (("row order", False), ("grouped", True))}
    ref = reference_logprobs(reference, rollout, 1.0, settings["row order"], device)
    def gradient(s: SelfPlaySettings) -> torch.Tensor:
        policy.zero_grad(set_to_none=True)
        backward_role(policy, role, ref, s, device, lambda loss: loss.backward())
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    times: dict[str, list[float]] = {k: [] for k in settings}
    grads = {}
    for _ in range(args.reps):
        for name, s in settings.items():
            start = time.perf_counter()
            grads[name] = gradient(s)
            times[name].append(time.perf_counter() - start)
    exact = gradient(dataclasses.replace(settings["row order"], amp_dtype=None))  # float32
    to_exact = {k: ((g - exact).norm() / exact.norm()).item() for k, g in grads.items()}
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    cols = {k: columns(rollout, role_batches(policy, rollout, s, s.share_prefix))
            for k, s in settings.items()}
    lengths = rollout.completion_mask.sum(-1).tolist()
    rel = ((grads["grouped"] - grads["row order"]).norm() / grads["row order"].norm()).item()
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, amx_bf16={mach['amx_bf16']}, "
          f"torch {mach['torch']}, autocast {amp}; micro-batch {args.micro_batch}, "
          f"gradient checkpointing")
    print(f"completion lengths (rows in order): {lengths} (real tokens: {sum(lengths)})")
    for k, v in times.items():
        print(f"{k}: median {med[k]:.2f} s per pass; all: {' '.join(f'{x:.2f}' for x in v)}; "
              f"completion columns computed: {cols[k]}")
    print(f"row order/grouped time ratio: {med['row order'] / med['grouped']:.3f}; columns "
          f"ratio {cols['row order'] / cols['grouped']:.3f}; gradient difference {rel:.1e} of its norm")
    print("distance of each bf16 gradient from the float32 one (of its norm): "
          + ", ".join(f"{k} {v:.1e}" for k, v in to_exact.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "autocast": str(amp), "lengths": lengths,
                       "seconds": times, "median_s": med, "columns": cols,
                       "grad_rel_diff": rel, "grad_rel_diff_to_float32": to_exact}, f, indent=1)


if __name__ == "__main__":
    main()
