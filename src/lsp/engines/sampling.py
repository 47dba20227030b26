"""What a rollout samples from, shared by every engine: the sampling settings, the EOS ids, and
the token distribution (temperature, then top-k, then top-p, as transformers applies them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    batch_size: int = 64  # rows per generate call (memory bound on large models)
    engine: str = "lsp"  # lsp: our KV-cache loop (module doc) | hf: transformers generate


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


