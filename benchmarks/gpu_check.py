"""One prepared device check (issue 36, point 4; docs/gpu.md): the paper's step on the machine this
project may be lent (one H100 80 GB or one H200, 15 minutes of device time in all, no network, the
machine's own torch and transformers, no vLLM).

    python benchmarks/gpu_check.py                       # CUDA: Llama-3.2-1B and 3B shapes, full and LoRA
    python benchmarks/gpu_check.py --size tiny           # any CPU (CI: tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --memory-table        # docs/gpu.md's estimated memory table

What runs, per size and mode, in this one process: random-weight Llama models built from configs
(`bench_gpu_step.SHAPES`, `lsp.models.ensure_random_llama`; the LM head at Llama-3's 128,256
tokens through a byte-level tokenizer of that size, so no tokenizer is downloaded), then one
self-play step of `experiment=paper_llama3b` ("full": fp32 master weights under bf16 autocast)
or `experiment=paper_llama3b_lora` ("lora": bf16 frozen base, fp32 adapters), every engine
`lsp`, gradient checkpointing on, the batch N x G as the paper's and the lengths shortened to fit
the device budget (flags). Then four checks:
- devices: every parameter, buffer and optimiser-state tensor of the policy, the reference, the
  reward model and the judge is on the run's device;
- log-probs: the engine's own log-probs of the tokens it sampled (recorded inside its decoding
  loop) against the training pass's (`completion_logprobs`, the loss's path) on the same tokens:
  mean |difference| per token <= 0.05 nats. Both run the same weights under the same bf16
  autocast and differ only in kernel shapes (one token at a time on a KV cache vs the whole
  sequence, the fused LM head), i.e. bf16 rounding: this project measured 0.04 nats per token
  between a bf16 engine and the fp32 policy (rollout/logprob_gap at step 1); stale or wrong
  weights differ by nats;
- host synchronisation in the decoding loop: the host reads of tensors (bool(), .item(),
  .tolist(), .cpu(), .nonzero(), and on CUDA every synchronising op torch reports under
  `torch.cuda.set_sync_debug_mode`) counted over two generations of different lengths; the
  difference per extra token is the loop's own. Off the CPU it must be <= 1/8 per token (the loop
  asks whether every row ended once every `lsp.engines.own.SYNC_EVERY` = 16 tokens); the CPU loop
  reads every step by design (it drops finished rows), so there it is reported, not judged;
- peak memory: CUDA's peak allocated and reserved bytes of the step (with the estimate of
  `memory_estimate` for the same shapes); on a CPU the process's peak RSS, reported.
It prints ONE verdict table (and writes --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from bench_gpu_step import ROPE, SHAPES  # noqa: E402  (benchmarks/ is the script's folder)
from gpu_memory import memory_table, parameter_count

REPO = Path(__file__).resolve().parents[1]
LLAMA3_VOCAB = 128_256
GAP_BOUND = 0.05  # nats per token: the log-probs check (module doc)
SYNC_BOUND = 1 / 8  # host reads per decoded token off the CPU (module doc)
EXPERIMENTS = {"full": "paper_llama3b", "lora": "paper_llama3b_lora"}


def build_models(size: str, cache: Path, device: str, vocab: int) -> tuple[Path, Path]:
    """(policy folder, reward-model folder): random weights in bf16, built once per size."""
    import torch

    from lsp.models import byte_level_tokenizer, ensure_random_llama

    def tok():
        return byte_level_tokenizer(vocab - 3)  # + the 3 special tokens

    shapes = SHAPES[size] | ROPE
    return tuple(ensure_random_llama(cache / f"gpucheck-{size}-v{vocab}-{kind}", kind, tok, shapes,
                                     f"gpucheck-{size}-{kind}", dtype=torch.bfloat16,
                                     device=device) for kind in ("causal", "reward"))


def compose(args, mode: str, policy: Path, reward: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [
        f"experiment={EXPERIMENTS[mode]}", f"model.policy={policy}", f"reward.model={reward}",
        f"rollout.num_queries={args.queries}", f"rollout.group_size={args.group}",
        f"rollout.challenger.max_new_tokens={args.challenger_tokens}",
        f"rollout.solver.max_new_tokens={args.solver_tokens}",
        f"algo.self_reward.max_new_tokens={args.judge_tokens}", "rollout.reject_truncated=false",
        "rollout.challenger.engine=lsp", "rollout.solver.engine=lsp",
        "algo.self_reward.engine=lsp", "trainer.max_steps=1", f"seed={args.seed}",
        f"device={args.device}", *args.override]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


# ------------------------------------------------------------------------------------ checks
def off_device(module, device: str) -> tuple[int, int]:
    """(tensors checked, tensors not on `device`'s type): weights, buffers, optimiser state."""
    import torch

    models = [module.policy, module.frozen["reference"]]
    for name in ("reward", "self_reward"):
        model = getattr(module.frozen[name], "model", None)
        if isinstance(model, torch.nn.Module):
            models.append(model)
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
    for opt in module.trainer.optimizers:
        tensors += [v for state in opt.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.dim() > 0]
    kind = device.split(":")[0]
    return len(tensors), sum(t.device.type != kind for t in tensors)


@contextmanager
def recorded_logprobs(temperature: float):
    """Inside: the `lsp` engine's log-probs of the tokens it samples, under its own logits at
    `temperature`, appended per decoding step to the yielded list ((A,) each: the rows still in
    the batch; no host read is added to the loop)."""
    import torch

    from lsp.engines import own

    original, out = own.next_token, []

    def next_token(logits, cfg, greedy=False):
        nxt = original(logits, cfg, greedy)
        out.append(torch.log_softmax(logits.float() / temperature, -1).gather(-1, nxt[:, None])[:, 0])
        return nxt

    own.next_token = next_token
    try:
        yield out
    finally:
        own.next_token = original


def engine_matrix(steps: list, lengths: list[int]):
    """The recorded per-step log-probs as (B, C): at step t the loop holds every row (on a
    device) or, on the CPU, the rows whose completion is longer than t, in order."""
    import torch

    b, c = len(lengths), max(lengths)
    out = torch.zeros(b, c)
    for t, logp in enumerate(steps[:c]):
        rows = list(range(b)) if logp.shape[0] == b else [i for i in range(b) if lengths[i] > t]
        out[rows, t] = logp.float().cpu()
    return out


def logprob_gap(module, args) -> tuple[float, float]:
    """(mean, max) |engine log-prob - training-pass log-prob| per sampled token (module doc)."""
    import torch

    from lsp.models import autocast
    from lsp.selfplay.logprobs import completion_logprobs

    s, engine = module.settings, module.engines["solver"]
    prompts = [module.challenger_chat] * min(args.queries, 8)
    cfg = s.challenger.__class__(**{**vars(s.challenger), "max_new_tokens": args.check_tokens})
    module.policy.eval()
    with recorded_logprobs(cfg.temperature) as steps:
        rollout = engine.generate(prompts, cfg)
    mask = rollout.completion_mask.bool().cpu()  # (B, C)
    recorded = engine_matrix(steps, mask.sum(-1).tolist())
    with torch.no_grad(), autocast(module.device, s.amp_dtype):
        train = completion_logprobs(module.policy, rollout.sequences, rollout.attention_mask,
                                    rollout.prompt_len, cfg.temperature,
                                    fused_head=s.fused_lm_head).float().cpu()
    diff = (recorded[:, : mask.shape[1]] - train)[mask].abs()
    return diff.mean().item(), diff.max().item()


HOST_READS = ("__bool__", "item", "tolist", "cpu", "nonzero", "__int__", "__float__")


@contextmanager
def counted_host_reads(cuda: bool):
    """Inside: the yielded dict's "reads" counts Python-level host reads of tensors and, on CUDA,
    "syncs" every synchronising op torch warns of (set_sync_debug_mode)."""
    import torch

    counts = {"reads": 0, "syncs": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def read(self, *a, **k):
            counts["reads"] += 1
            return original(self, *a, **k)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            yield counts
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        counts["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_reads_per_token(module, args) -> float:
    """Host reads (CUDA: synchronising ops) per extra decoded token: two generations of
    different lengths, the difference over the extra tokens (prefill, tokenisation and the
    decoding of the text are the same in both and cancel)."""
    engine, s = module.engines["solver"], module.settings
    prompts = [module.challenger_chat] * min(args.queries, 8)
    cuda = str(module.device).startswith("cuda")
    totals, tokens = [], []
    for n in (args.check_tokens // 2, args.check_tokens):
        cfg = s.challenger.__class__(**{**vars(s.challenger), "max_new_tokens": n})
        with counted_host_reads(cuda) as counts:
            rollout = engine.generate(prompts, cfg)
        totals.append(counts["syncs"] if cuda else counts["reads"])
        tokens.append(rollout.completion_mask.shape[1])  # decoding steps taken
    return (totals[1] - totals[0]) / max(tokens[1] - tokens[0], 1)


# ------------------------------------------------------------------------------------- runs
def run_variant(args, size: str, mode: str, device: str) -> dict:
    """One step of `mode` at `size`, then the checks; the row of the verdict table."""
    import lightning as L
    import torch

    from lsp.config import validate
    from lsp.selfplay.data import SelfPlayData
    from lsp.train import build_module

    cuda = device.startswith("cuda")
    policy, reward = build_models(size, Path(args.cache), device, args.vocab)
    cfg = compose(args, mode, policy, reward)
    validate(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    module = build_module(cfg, device, None)
    trainer = L.Trainer(max_steps=1, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        precision="32-true")
    trainer.fit(module, datamodule=SelfPlayData())
    row = {"size": size, "mode": mode, "device": device, "step_s": time.perf_counter() - start,
           "gradient_checkpointing": bool(module.policy.is_gradient_checkpointing),
           "trainable": sum(p.numel() for p in module.policy.parameters() if p.requires_grad)}
    if cuda:
        torch.cuda.synchronize()
        row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        import resource

        row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row["tensors"], row["off_device"] = off_device(module, device)
    row["gap_mean"], row["gap_max"] = logprob_gap(module, args)
    row["reads_per_token"] = host_reads_per_token(module, args)
    est = memory_table(parameter_count(SHAPES[size] | {"vocab_size": args.vocab}))
    row["estimated_gb"] = est[mode]["total_gb"]
    del module, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row | verdicts(row, cuda)


def verdicts(row: dict, cuda: bool) -> dict:
    ok = {"devices": row["off_device"] == 0, "logprobs": row["gap_mean"] <= GAP_BOUND,
          "syncs": row["reads_per_token"] <= SYNC_BOUND if cuda else None,
          "checkpointing": row["gradient_checkpointing"]}
    return {"checks": ok, "pass": all(v is not False for v in ok.values())}


def table(rows: list[dict]) -> str:
    """The one verdict table."""
    head = ("size", "mode", "device", "step s", "peak GB", "est. GB", "tensors off device",
            f"logprob gap mean/max (<= {GAP_BOUND})", f"host reads/token (<= {SYNC_BOUND:.3g})",
            "verdict")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | {r['device']} | FAILED: {r['error']} |")
            continue
        peak = r.get("peak_allocated_gb", r.get("peak_rss_gb"))
        peak_s = f"{peak:.3g}" + ("" if "peak_allocated_gb" in r else " (RSS)")
        reads = f"{r['reads_per_token']:.3g}" + ("" if r["checks"]["syncs"] is not None
                                                 else " (CPU loop: by design)")
        cells = (r["size"], r["mode"], r["device"], f"{r['step_s']:.1f}", peak_s,
                 f"{r['estimated_gb']:.3g}", f"{r['off_device']}/{r['tensors']}",
                 f"{r['gap_mean']:.2e} / {r['gap_max']:.2e}", reads,
                 "PASS" if r["pass"] else "FAIL")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", nargs="+", choices=list(SHAPES), default=None,
                   help="default: 1b 3b on CUDA, tiny elsewhere")
    p.add_argument("--modes", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--queries", type=int, default=8, help="N (paper: 8)")
    p.add_argument("--group", type=int, default=4, help="G")
    p.add_argument("--challenger-tokens", type=int, default=128)
    p.add_argument("--solver-tokens", type=int, default=256)
    p.add_argument("--judge-tokens", type=int, default=128)
    p.add_argument("--check-tokens", type=int, default=64, help="tokens of the checks' generations")
    p.add_argument("--vocab", type=int, default=LLAMA3_VOCAB, help="the models' vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lsp" / "gpu_check"))
    p.add_argument("--override", action="append", default=[], help="a further Hydra override")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--memory-table", action="store_true", help="print docs/gpu.md's table, exit")
    p.add_argument("--isolate", action="store_true",
                   help="each variant in its own process (always on CUDA)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # size:mode, run by `variant`
    return p.parse_args(argv)


def variant(args, size: str, mode: str, device: str) -> dict:
    """`run_variant`'s row, or the failure as a row. On CUDA (or with --isolate) in a fresh
    subprocess: its own CUDA context and peak, and nothing of the previous variant left in
    memory (a 1B step's 25 GB would not fit beside the 3B's)."""
    if not (args.isolate or device.startswith("cuda")) or args.variant:
        try:
            return run_variant(args, size, mode, device)
        except Exception as err:  # one failed variant still leaves the others' rows
            return {"size": size, "mode": mode, "device": device,
                    "error": f"{type(err).__name__}: {err}"[:300]}
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, *args.argv, "--variant", f"{size}:{mode}",
               "--json", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())[0]
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"size": size, "mode": mode, "device": device,
                "error": f"exit {proc.returncode}: {' / '.join(tail)}"[:300]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = [a for a in argv if a != "--json" and not a.endswith(".json")]
    if args.memory_table:
        from gpu_memory import markdown

        print(markdown())
        return 0
    from lsp.models import resolve_device

    device = resolve_device(args.device)
    args.device = device
    sizes = args.size or (["1b", "3b"] if device.startswith("cuda") else ["tiny"])
    pairs = [(size, mode) for size in sizes for mode in args.modes]
    if args.variant:
        pairs = [tuple(args.variant.split(":"))]
    rows = []
    for size, mode in pairs:
        rows.append(variant(args, size, mode, device))
        print(f"[gpu_check] {size} {mode} done", file=sys.stderr, flush=True)
    if not args.variant:
        print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r.get("pass") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
