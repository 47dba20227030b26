"""Batched sampling for both roles, returning `Rollout` records.

Generation runs under no_grad (no autograd graph; not inference_mode, whose tensors autograd
refuses to reuse; the training forward pass recomputes
log-probs with gradients, once). Prompts are left-padded so that every completion starts at the
same column; `generate` stops as soon as every row has produced EOS.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from lsp.records import Rollout


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    batch_size: int = 64  # rows per generate call (memory bound on large models)


def render_chat(tokenizer, user_message: str, system: str | None = None) -> str:
    """The prompt string for one user turn, ending with the assistant's generation prompt."""
    messages = [{"role": "user", "content": user_message}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
    sampling = {} if greedy else {
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
    }
    with autocast(model.device, amp_dtype):
        out = model.generate(
            **enc, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id, do_sample=not greedy, **sampling,
        )
    prompt_len = enc["input_ids"].shape[1]
    completion = out[:, prompt_len:]
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
    )
