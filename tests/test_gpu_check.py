"""benchmarks/gpu_check.py (issue 36, point 4) at the tiny size on CPU, so the script a lent GPU runs
is known to work up to the device; its memory estimate (benchmarks/gpu_memory.py) by hand; and the
decoding loop it judges off the CPU (lsp.engines.own, `sync_every` > 1): the same tokens as the
CPU loop, without a host read per token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_memory  # noqa: E402


def test_the_device_check_runs_at_tiny_size_on_cpu(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = gpu_check.main(["--size", "tiny", "--device", "cpu", "--queries", "2", "--group", "2",
                         "--challenger-tokens", "6", "--solver-tokens", "6", "--judge-tokens", "6",
                         "--check-tokens", "8", "--vocab", "300", "--cache", str(tmp_path),
                         "--json", str(out), "--override", "model.amp=auto",
                         "--override", "algo.self_reward.mode=logits"])
    # amp auto: bf16 is emulated on a CPU without it (minutes; the lent GPU runs the configs' bf16);
    # the judge reads its score from logits (the byte-level prompts are thousands of tokens)
    rows = json.loads(out.read_text())
    assert rc == 0, rows
    assert [(r["size"], r["mode"]) for r in rows] == [("tiny", "full"), ("tiny", "lora")]
    for r in rows:
        assert r["pass"] and r["gradient_checkpointing"]
        assert r["tensors"] > 0 and r["off_device"] == 0
        assert r["gap_mean"] <= gpu_check.GAP_BOUND
        assert r["reads_per_token"] > 0  # the CPU loop reads every step: counted, not judged
    full, lora = rows
    assert lora["trainable"] < full["trainable"] / 4  # only the adapters train
    table = capsys.readouterr().out
    assert table.count("| tiny |") == 2 and "verdict" in table


def test_the_memory_estimate_by_hand():
    counts = gpu_memory.parameter_count(gpu_memory.LLAMA_3B, lora_r=16)
    # embedding 128256 x 3072 = 394,002,432 (tied head); per layer q 3072^2 + k, v 3072 x 1024
    # each + o 3072^2 + gate, up, down 3 x 3072 x 8192 + 2 norms of 3072 = 100,669,440; x 28;
    # + the final norm 3072: Llama-3.2-3B's published 3,212,749,824
    assert counts["base"] == 394_002_432 + 28 * 100_669_440 + 3072 == 3_212_749_824
    # LoRA r=16: r x (in + out) summed over the 7 linears: 16 x 54,272 per layer, x 28
    assert counts["adapters"] == 16 * 54_272 * 28 == 24_313_856
    full = gpu_memory.memory_table(counts, card_gb=80, engines=(0.12, 0.12))["full"]
    assert full["policy weights"] == pytest.approx(4 * 3_212_749_824 / 1e9)
    assert full["gradients + AdamW"] == pytest.approx(12 * 3_212_749_824 / 1e9)
    assert full["vLLM engines"] == pytest.approx(0.24 * 80)
    lora = gpu_memory.memory_table(counts)["lora"]
    assert lora["reference copy"] == 0  # pi_ref is the policy with its adapters disabled
    assert lora["gradients + AdamW"] == pytest.approx(12 * 24_313_856 / 1e9)
    assert "estimated" in gpu_memory.markdown()


def test_the_on_device_decoding_loop_reads_the_host_every_16_tokens_only():
    from lsp.engines.own import decode
    from lsp.engines.sampling import SamplingConfig, completion_mask, eos_ids
    from lsp.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("tiny:causal")
    tok = load_tokenizer(path)
    enc = tok(["hello there", "a", "what is up"], return_tensors="pt", padding=True,
              add_special_tokens=False)
    out, reads = {}, {}
    for attn in ("sdpa",):  # a GPU's attention: transformers reads a 2D mask on the host, not a 4D one
        model = load_causal_lm(path, attn_implementation=attn).eval()
        eos = eos_ids(model, tok)
        for every, n in ((1, 32), (16, 32), (16, 64)):
            with torch.no_grad(), gpu_check.counted_host_reads(False) as counts:
                ids = decode(model, enc["input_ids"], enc["attention_mask"],
                             SamplingConfig(max_new_tokens=n), eos, tok.pad_token_id,
                             greedy=True, sync_every=every)
            mask, _ = completion_mask(ids, eos)
            out[attn, every, n] = torch.where(mask.bool(), ids, -1)[:, :32]
            reads[attn, every, n] = counts["reads"]
        assert torch.equal(out[attn, 1, 32], out[attn, 16, 32])  # the same tokens
        # 32 more tokens cost 2 more reads (one per 16 tokens), not one or two per token
        assert reads[attn, 16, 64] - reads[attn, 16, 32] == 2
        assert reads[attn, 1, 32] >= 32  # the CPU loop: every step
