"""The fused LM head's vocabulary slice size (`lsp.selfplay.lm_head._SLICE_ELEMENTS`): forward
and backward of `linear_token_logprobs` at several sizes, side by side in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_head_slices.py [--reps 6] [--rows 870]

Inputs shaped as `make bench`'s Solver pass: `--rows` completion tokens (870: its median
answer tokens per step), SmolLM2's head (49,152 x 576, float32 master weight, requiring grad)
under bf16 autocast where the CPU runs bf16 natively (`model.amp: auto`), seeded random values.
The sizes alternate within each repetition; the first repetition is warm-up; medians over the
rest. The heap allocator is set as training sets it (`trainer.cpu_allocator: heap`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_step import machine  # noqa: E402  (benchmarks/ is the script's folder)

from lsp.models import amp_dtype, autocast
from lsp.selfplay import lm_head
from lsp.selfplay.runtime import configure_cpu_allocator

SIZES = [1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22]  # float32 elements of one slice's logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=870)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    configure_cpu_allocator("heap")
    amp = amp_dtype("auto", "cpu")
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(49152, 576, generator=gen) * 0.02).requires_grad_()
    hidden = torch.randn(args.rows, 576, generator=gen).requires_grad_()
    targets = torch.randint(0, 49152, (args.rows,), generator=gen)
    shipped = lm_head._SLICE_ELEMENTS
    times: dict[int, list[tuple[float, float]]] = {s: [] for s in SIZES}
    try:
        for rep in range(args.reps):
            for size in SIZES:
                lm_head._SLICE_ELEMENTS = size
                weight.grad = hidden.grad = None
                start = time.perf_counter()
                with autocast("cpu", amp):
                    out = lm_head.linear_token_logprobs(hidden, weight, targets)
                forward = time.perf_counter() - start
                out.sum().backward()
                if rep:
                    times[size].append((forward, time.perf_counter() - start - forward))
    finally:
        lm_head._SLICE_ELEMENTS = shipped
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, amx_bf16={mach['amx_bf16']}, "
          f"autocast {amp}; {args.rows} rows; shipped slice size {shipped}")
    med = {s: [statistics.median(t[i] for t in v) for i in (0, 1)] for s, v in times.items()}
    for size, (f, b) in med.items():
        print(f"slice {size:>8} elements: forward {1e3 * f:.1f} ms, backward {1e3 * b:.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": mach, "rows": args.rows, "median_s": med,
                       "seconds": {str(k): v for k, v in times.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
