"""GPU memory of the paper's step, ESTIMATED from parameter counts (issue 36, point 5; docs/gpu.md).

    python benchmarks/gpu_memory.py          # the 3B table of docs/gpu.md (80 GB and 141 GB cards)

No device was lent to issue 36, so every cell is an estimate; benchmarks/gpu_check.py prints
measured peaks beside this estimate when it runs on one. What is counted (bytes; GB = 1e9):
- static: the policy's weights; with full fine-tuning its fp32 gradients and AdamW's two fp32
  moments for every weight (16 bytes per parameter in all, fp32 master weights), with LoRA the
  frozen base in its dtype and the same 16 bytes per ADAPTER parameter only; pi_ref (full: its
  own copy in `model.reference_dtype`; LoRA: the policy with its adapters disabled, 0 bytes); the
  reward model (bf16); every vLLM engine takes `gpu_memory_utilization` x the card (weights and
  KV cache inside it);
- dynamic, the larger of two phases (they do not overlap): decoding on the policy (engine `lsp`:
  the KV cache of N x G rows of prompt + answer, bf16) and the training pass (gradient
  checkpointing: each layer's input kept per token (4 bytes x hidden x layers), plus one layer's
  recomputed working set, bf16).
Not counted: the CUDA context and allocator slack (about 1-3 GB), fragmentation.
"""

from __future__ import annotations

LLAMA_3B = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
            "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 128_256}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linears(c: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder layer."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_count(c: dict, lora_r: int = 0, targets=TARGETS) -> dict[str, int]:
    """{"base": a tied-embedding Llama's parameters, "adapters": LoRA's r x (in + out) per
    targeted linear}."""
    per_layer = sum(a * b for a, b in _linears(c).values()) + 2 * c["hidden_size"]
    base = c["vocab_size"] * c["hidden_size"] + c["num_hidden_layers"] * per_layer + c["hidden_size"]
    adapters = lora_r * sum(a + b for name, (a, b) in _linears(c).items() if name in targets)
    return {"base": base, "adapters": adapters * c["num_hidden_layers"], "config": c}


def memory_table(counts: dict, card_gb: float | None = None, engines: tuple = (),
                 rows: int = 32, tokens: int = 1324, micro_batch: int = 4,
                 reference_bytes: int = 4) -> dict[str, dict[str, float]]:
    """GB per component for "full" (fp32 master weights + AdamW, pi_ref a copy of
    `reference_bytes` per weight) and "lora" (bf16 base, fp32 adapters + AdamW, pi_ref shared).
    engines: each vLLM engine's gpu_memory_utilization (of `card_gb`); rows x tokens: the
    decoded batch (N x G, prompt + answer); micro_batch: rows per training pass."""
    c, p, a = counts["config"], counts["base"], counts["adapters"]
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    kv = rows * tokens * layers * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    act = micro_batch * tokens * (layers * h * 4 + (12 * h + 3 * c["intermediate_size"]) * 2)
    shared = {"reward model": 2 * p, "vLLM engines": sum(engines) * (card_gb or 0) * 1e9,
              "dynamic (max of decode KV, activations)": max(kv, act)}
    out = {
        "full": {"policy weights": 4 * p, "gradients + AdamW": 12 * p,
                 "reference copy": reference_bytes * p} | shared,
        "lora": {"policy weights": 2 * p + 4 * a, "gradients + AdamW": 12 * a,
                 "reference copy": 0} | shared,
    }
    for parts in out.values():
        gb = {k: v / 1e9 for k, v in parts.items()}
        parts.clear()
        parts.update(gb | {"total_gb": sum(gb.values())})
    return out


def markdown() -> str:
    """docs/gpu.md's table: the 3B in each experiment's own engine layout, on 80 and 141 GB."""
    full, lora = parameter_count(LLAMA_3B), parameter_count(LLAMA_3B, lora_r=16)
    layouts = [  # (label, counts, mode, vLLM engines' utilisation)
        ("full, paper_llama3b (2 vLLM engines x 0.12)", full, "full", (0.12, 0.12)),
        ("full, every engine lsp", full, "full", ()),
        ("LoRA r=16, paper_llama3b_lora (1 vLLM engine x 0.3)", lora, "lora", (0.3,)),
        ("LoRA r=16, every engine lsp", lora, "lora", ()),
    ]
    lines = ["| setting (Llama-3.2-3B) | 80 GB card | 141 GB card |", "|---|---|---|"]
    for label, counts, mode, engines in layouts:
        cells = []
        for card in (80, 141):
            total = memory_table(counts, card, engines)[mode]["total_gb"]
            cells.append(f"{total:.0f} GB estimated ({'fits' if total < card else 'does not fit'})")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines.append(f"Parameters: base {full['base'] / 1e9:.2f} B; LoRA r=16 adapters "
                 f"{lora['adapters'] / 1e6:.1f} M. Components (80 GB card, GB):")
    lines.append("")
    for label, counts, mode, engines in layouts:
        parts = memory_table(counts, 80, engines)[mode]
        lines.append(f"- {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
