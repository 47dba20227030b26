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
  causal LM (a KV-cache argument and `logits_to_keep`): checked once, when the engine is built,
  and refused with a clear error for other models (use `hf` for them), never a silent fallback.
  The KV cache is a DynamicCache whose full-attention layers reserve room for the whole
  completion on their first update (`reserved_cache`) and write every step in place
  (concatenating the whole cache at every step was 21% of decoding time).
- `hf`: `model.generate`, with the model's own generation_config (a repetition penalty, min_p, ...
  shipped with the model) set aside for the call, so that it samples the same distribution.
"""


from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from lsp.engines.sampling import SamplingConfig, completion_mask, eos_ids, next_token
from lsp.errors import InputError
from lsp.models import autocast
from lsp.selfplay.logprobs import cache_argument, prompt_groups
from lsp.selfplay.records import Rollout, concat_rollouts


class EngineUnavailableError(InputError):
    """The configured engine cannot decode this model (the message says which engine can)."""


def lsp_cache_argument(model) -> str:
    """The KV-cache argument the `lsp` loop passes the cache by; refused, naming the fix, for a
    model without one (rather than silently decoding with another engine)."""
    name = cache_argument(model)
    if name is None:
        raise EngineUnavailableError(
            f"engine: lsp needs a transformers (>= 5) causal LM whose forward takes a KV-cache "
            f"argument (past_key_values or cache) and logits_to_keep; {type(model).__name__} has "
            "none: use engine: hf")
    return name


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig,
             amp_dtype: torch.dtype | None = None, greedy: bool = False) -> Rollout:
    if cfg.engine == "lsp":
        lsp_cache_argument(model)  # before any work (EnginePool.get checks it when built)
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
        if cfg.engine == "lsp":
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


SYNC_EVERY = 16  # off the CPU: decoding steps between the host's checks that every row ended


def decode(model, ids: Tensor, mask: Tensor, cfg: SamplingConfig, eos: list[int], pad_id: int,
           greedy: bool = False, sync_every: int | None = None) -> Tensor:
    """Left-padded prompts ids, mask (B, P) -> (B, C) sampled completion ids, C <= max_new_tokens,
    `pad_id` after a row's EOS (or, off the CPU, anything: the caller masks after EOS).
    KV-cache decoding with shared prompt prefill (module doc). sync_every (None: 1 on the CPU,
    else SYNC_EVERY): 1 checks every step on the host whether rows ended and drops them from
    the batch (less work: CPU); k > 1 keeps every row and asks the host every k steps only
    (`_decode_on_device`: no host synchronisation in between, so a GPU is never left idle)."""
    if sync_every is None:
        sync_every = 1 if ids.device.type == "cpu" else SYNC_EVERY
    batch, width = ids.shape
    groups = prompt_groups(ids, mask, width)
    groups = torch.arange(batch, device=ids.device) if groups is None else groups  # (B,)
    first = torch.cat([groups.new_ones(1), groups[1:] != groups[:-1]]).nonzero()[:, 0]  # (Q,)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, P) positions count real tokens
    name = lsp_cache_argument(model)
    cache = reserved_cache(model, cfg.max_new_tokens)
    out = model(input_ids=ids[first], attention_mask=mask[first], position_ids=pos[first],
                use_cache=True, logits_to_keep=1, **{name: cache})
    cache.reorder_cache(groups)  # (Q, ...) -> (B, ...)
    logits = out.logits[:, -1][groups]  # (B, V)
    tokens = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    eos_t = torch.tensor(eos, device=ids.device)
    if sync_every > 1:
        return _decode_on_device(model, name, cache, logits, tokens, mask, pos[:, -1] + 1, cfg,
                                 eos_t, greedy, sync_every)
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


def _decode_on_device(model, name, cache, logits, tokens, mask, next_pos, cfg, eos_t, greedy,
                      sync_every: int) -> Tensor:
    """`decode`'s loop without host synchronisation between checks: every row stays in the
    batch (a row that ended samples on, masked later by `completion_mask`), the host reads
    whether all rows ended every `sync_every` steps only, and an SDPA model gets its attention
    mask in 4D (B, 1, 1, K) form, which transformers uses as given instead of reading the 2D
    mask's values on the host at every step (masking_utils' `fast_all`)."""
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)  # (B,)
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    for t in range(cfg.max_new_tokens):
        nxt = next_token(logits, cfg, greedy)  # (B,)
        tokens[:, t] = nxt
        done = done | torch.isin(nxt, eos_t)
        if t == cfg.max_new_tokens - 1 or ((t + 1) % sync_every == 0 and bool(done.all())):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, K)
        step_mask = mask[:, None, None, :].bool() if sdpa else mask
        logits = model(input_ids=nxt[:, None], attention_mask=step_mask,
                       position_ids=next_pos[:, None], use_cache=True, **{name: cache}
                       ).logits[:, -1]
        next_pos = next_pos + 1
    return tokens[:, : t + 1]


def reserved_cache(model, room: int):
    """The cache the model would build itself (`DynamicCache(config=...)`: sliding-window layers
    and the like as its config says), with every plain full-attention layer a reserving layer
    (`_reserved_layer_class`) that keeps `room` positions free past the prompt."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    reserved = _reserved_layer_class()
    cache = DynamicCache(config=model.config)
    cache.layers = [reserved(room) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # layers made lazily, one per model layer
        cache.layer_class_to_replicate = functools.partial(reserved, room)
    return cache


@functools.cache
def _reserved_layer_class():
    """`_Reserving` over transformers' DynamicLayer, made on first use: transformers is imported
    only by the code that needs it."""
    from transformers.cache_utils import DynamicLayer

    return type("ReservedLayer", (_Reserving, DynamicLayer), {})


class _Reserving:
    """A DynamicLayer (the next class in the MRO) whose keys / values are views of the first n
    positions of buffers (B, H, n + room, D), allocated after its first update (the prompt): each
    decoding step writes its position in place instead of concatenating (copying) the whole
    cache. Out of room, or once something else has replaced the views (offloading, a batch
    repeat), it grows by concatenation like DynamicLayer."""

    def __init__(self, room: int, **kwargs):
        super().__init__(**kwargs)
        self.room = room
        self.buffers: list[Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.get_seq_length() == 0:  # the prompt: as DynamicLayer, then the room
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self._reserve()
            return keys, values  # DynamicLayer's own: the prompt's attention is unchanged
        n, t = self.keys.shape[-2], key_states.shape[-2]
        if not self._in_buffers() or n + t > self.buffers[0].shape[-2]:
            self.buffers = None  # from here on a plain DynamicLayer
            return super().update(key_states, value_states, *args, **kwargs)
        self.buffers[0][:, :, n : n + t] = key_states
        self.buffers[1][:, :, n : n + t] = value_states
        self._view(n + t)
        return self.keys, self.values

    def _reserve(self) -> None:
        n = self.keys.shape[-2]
        self.buffers = [x.new_empty(x.shape[:2] + (n + self.room, x.shape[-1]))
                        for x in (self.keys, self.values)]
        for buf, x in zip(self.buffers, (self.keys, self.values), strict=True):
            buf[:, :, :n] = x
        self._view(n)

    def _view(self, n: int) -> None:
        self.keys, self.values = (buf[:, :, :n] for buf in self.buffers)

    def _in_buffers(self) -> bool:
        # keys still a view of our buffer (crop keeps them one; offload or a repeat do not)
        return self.buffers is not None and self.keys.data_ptr() == self.buffers[0].data_ptr()

    def _select(self, index) -> bool:
        """Keep rows `index` of the buffers (the views follow); False when not in them."""
        if not self._in_buffers():
            return False
        n = self.keys.shape[-2]
        self.buffers = [buf.index_select(0, index.to(buf.device)) for buf in self.buffers]
        self._view(n)
        return True

    def reorder_cache(self, beam_idx) -> None:
        if not self._select(beam_idx):
            super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices) -> None:
        if not self._select(indices):
            super().batch_select_indices(indices)

    def reset(self) -> None:
        self.buffers = None
        super().reset()


class TorchEngine:
    """`lsp` / `hf` decoding on the model object (`lsp.engines.own.generate`, which refuses
    `engine: lsp` on a model the loop cannot decode; `EnginePool.get` refuses it when built)."""

    pushes_weights = False  # decodes on the model object: always current

    def __init__(self, model, tokenizer, amp_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.amp_dtype = model, tokenizer, amp_dtype

    def generate(self, prompts: list[str], cfg: SamplingConfig, greedy: bool = False) -> Rollout:
        return generate(self.model, self.tokenizer, prompts, cfg, self.amp_dtype, greedy)

    def push(self, model, state_dict: dict | None = None) -> None:  # decodes with the model itself
        return None


