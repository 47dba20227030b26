"""Batched sampling for both roles, returning `Rollout` records.

Generation runs under no_grad (no autograd graph; not inference_mode, whose tensors autograd
refuses to reuse; the training forward pass recomputes
log-probs with gradients, once). Prompts are left-padded so that every completion starts at the
same column; `generate` stops as soon as every row has produced EOS.

Two decoding engines (`SamplingConfig.engine`), the same sampling distribution (temperature, then
top-k, then top-p, as transformers applies them):
- `lsp` (default): our own KV-cache loop. Rows with the same prompt (a query's G answers, the
  Challenger's N samples of its one prompt) prefill that prompt once and share its cache; a row
  that has produced EOS leaves the batch (no work on padding); the next token is drawn by
  inverse-CDF sampling (one uniform per row; `torch.multinomial` draws one exponential per
  vocabulary entry, ~10 ms per step for 16 x 49k on this CPU). Needs a transformers (>= 5)
  causal LM (a KV-cache argument and `logits_to_keep`); other models fall back to `hf`.
- `hf`: `model.generate`, with the model's own generation_config (a repetition penalty, min_p, ...
  shipped with the model) set aside for the call, so that it samples the same distribution.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from lsp.logprobs import cache_argument, prompt_groups
from lsp.records import Rollout


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    batch_size: int = 64  # rows per generate call (memory bound on large models)
    engine: str = "lsp"  # lsp: our KV-cache loop (module doc) | hf: transformers generate


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked (fp32 master weights stay untouched); a no-op for None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_mask(completion_ids: Tensor, eos: list[int]) -> tuple[Tensor, Tensor]:
    """(B, C) ids -> (mask (B, C) with 1 up to and including the first EOS, ended (B,) bool)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    eos_before = torch.cumsum(is_eos.int(), dim=-1) - is_eos.int()  # EOS count strictly before t
    return (eos_before == 0).long(), is_eos.any(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig,
             amp_dtype: torch.dtype | None = None, greedy: bool = False) -> Rollout:
    parts = [
        _generate_chunk(model, tokenizer, prompts[i : i + cfg.batch_size], cfg, amp_dtype, greedy)
        for i in range(0, len(prompts), cfg.batch_size)
    ]
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, tokenizer.pad_token_id)


def _generate_chunk(model, tokenizer, prompts, cfg, amp_dtype, greedy) -> Rollout:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(model.device)
    eos = eos_ids(model, tokenizer)
    with autocast(model.device, amp_dtype):
        if cfg.engine == "lsp" and cache_argument(model) is not None:
            completion = decode(model, enc["input_ids"], enc["attention_mask"], cfg, eos,
                                tokenizer.pad_token_id, greedy)
        else:
            completion = _hf_generate(model, enc, cfg, eos, tokenizer.pad_token_id, greedy)
    prompt_len = enc["input_ids"].shape[1]
    mask, ended = completion_mask(completion, eos)
    completion = torch.where(mask.bool(), completion, tokenizer.pad_token_id)
    return Rollout(
        sequences=torch.cat([enc["input_ids"], completion], dim=1),
        attention_mask=torch.cat([enc["attention_mask"], mask], dim=1),
        prompt_len=prompt_len,
        completion_mask=mask,
        prompts=list(prompts),
        completions=tokenizer.batch_decode(completion, skip_special_tokens=True),
        truncated=~ended,
    )


def _hf_generate(model, enc, cfg: SamplingConfig, eos, pad_id, greedy) -> Tensor:
    sampling = {} if greedy else {
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
    }
    with _plain_generation_config(model):
        out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                             pad_token_id=pad_id, do_sample=not greedy, **sampling)
    return out[:, enc["input_ids"].shape[1] :]  # (B, C)


@contextlib.contextmanager
def _plain_generation_config(model):
    """`generate` fills every setting the call leaves unset from `model.generation_config` (a
    repetition penalty, min_p, no_repeat_ngram_size, ... shipped with the model), which would
    sample from another distribution than the one the training log-probs describe. Swap in
    transformers' plain defaults for the call, so only the three settings above apply."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


def decode(model, ids: Tensor, mask: Tensor, cfg: SamplingConfig, eos: list[int], pad_id: int,
           greedy: bool = False) -> Tensor:
    """Left-padded prompts ids, mask (B, P) -> (B, C) sampled completion ids, C <= max_new_tokens,
    `pad_id` after a row's EOS. KV-cache decoding with shared prompt prefill (module doc)."""
    batch, width = ids.shape
    groups = prompt_groups(ids, mask, width)
    groups = torch.arange(batch, device=ids.device) if groups is None else groups  # (B,)
    first = torch.cat([groups.new_ones(1), groups[1:] != groups[:-1]]).nonzero()[:, 0]  # (Q,)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, P) positions count real tokens
    out = model(input_ids=ids[first], attention_mask=mask[first], position_ids=pos[first],
                use_cache=True, logits_to_keep=1)
    name = cache_argument(model)
    cache = getattr(out, name)
    cache.reorder_cache(groups)  # (Q, ...) -> (B, ...)
    reserve(cache, cfg.max_new_tokens)
    logits = out.logits[:, -1][groups]  # (B, V)
    tokens = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    eos_t = torch.tensor(eos, device=ids.device)
    rows = torch.arange(batch, device=ids.device)  # original index of each active row
    next_pos = pos[:, -1] + 1  # (A,)
    for t in range(cfg.max_new_tokens):
        nxt = next_token(logits, cfg, greedy)  # (A,)
        tokens[rows, t] = nxt
        live = ~torch.isin(nxt, eos_t)
        if t == cfg.max_new_tokens - 1 or not bool(live.any()):
            break
        if not bool(live.all()):  # finished rows leave the batch
            keep = live.nonzero()[:, 0]
            rows, nxt, mask, next_pos = rows[keep], nxt[keep], mask[keep], next_pos[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       use_cache=True, **{name: cache}).logits[:, -1]
        next_pos = next_pos + 1
    return tokens[:, : t + 1]


def reserve(cache, extra: int) -> None:
    """Give every plain DynamicCache layer room for `extra` more positions, so that decoding
    writes in place instead of concatenating (copying) the whole cache at every step."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            layer.__class__ = _reserved_layer_class()
            layer.reserve(extra)


@functools.cache
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class Reserved(DynamicLayer):
        # keys/values are views of the first n positions of buffers (B, H, n + room, D).
        def reserve(self, extra: int) -> None:
            n = self.keys.shape[-2]
            self.buffers = [x.new_empty(x.shape[:2] + (n + extra, x.shape[-1])) for x in
                            (self.keys, self.values)]
            for buf, x in zip(self.buffers, (self.keys, self.values), strict=True):
                buf[:, :, :n] = x
            self._view(n)

        def _view(self, n: int) -> None:
            self.keys, self.values = (buf[:, :, :n] for buf in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            n, t = self.keys.shape[-2], key_states.shape[-2]
            if n + t > self.buffers[0].shape[-2]:  # out of room: grow like DynamicLayer
                self.__class__ = DynamicLayer  # (zero-arg super() would no longer apply)
                return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)
            self.buffers[0][:, :, n : n + t] = key_states
            self.buffers[1][:, :, n : n + t] = value_states
            self._view(n + t)
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            n = self.keys.shape[-2]
            self.buffers = [buf[indices] for buf in self.buffers]
            self._view(n)

    return Reserved


def sampling_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(A, V) logits -> (A, V) the distribution a token is drawn from: temperature, then top-k,
    then top-p (unnormalised after top-p: the sampler scales by the total)."""
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # (A, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (A, V)
    if cfg.top_p < 1.0:
        probs = top_p_filter(probs, cfg.top_p)
    return probs


def next_token(logits: Tensor, cfg: SamplingConfig, greedy: bool = False) -> Tensor:
    """(A, V) logits -> (A,) token ids: argmax, or a sample from `sampling_probs`."""
    if greedy:
        return logits.argmax(-1)
    probs = sampling_probs(logits, cfg)
    # Inverse-CDF sampling: the first token whose cumulative probability exceeds u * total.
    cdf = probs.cumsum(-1)  # (A, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)[:, 0]


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """(A, V) probabilities -> the same with everything outside the nucleus zeroed: the
    smallest set of most likely tokens whose mass reaches top_p (at least one token)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already enough
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _pad_to(x: Tensor, width: int, value: int, left: bool) -> Tensor:
    pad = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different prompt/completion widths into one (left/right re-padding)."""
    p = max(r.prompt_len for r in parts)
    c = max(r.completion_mask.shape[1] for r in parts)

    def cat(r: Rollout, x: Tensor, value: int) -> Tensor:
        prompt = _pad_to(x[:, : r.prompt_len], p, value, left=True)
        return torch.cat([prompt, _pad_to(x[:, r.prompt_len :], c, value, left=False)], dim=1)

    return Rollout(
        sequences=torch.cat([cat(r, r.sequences, pad_id) for r in parts]),
        attention_mask=torch.cat([cat(r, r.attention_mask, 0) for r in parts]),
        prompt_len=p,
        completion_mask=torch.cat([_pad_to(r.completion_mask, c, 0, False) for r in parts]),
        prompts=[s for r in parts for s in r.prompts],
        completions=[s for r in parts for s in r.completions],
        truncated=torch.cat([r.truncated for r in parts]),
        logprobs=None if any(r.logprobs is None for r in parts) else torch.cat(
            [_pad_to(r.logprobs, c, 0.0, False) for r in parts]),
    )
