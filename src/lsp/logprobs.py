"""Per-token log-probabilities of sampled tokens, and masked reductions.

Layout contract for a batch of (prompt, completion) pairs, shared with rollout.py:
``sequences`` (B, P + C) is a LEFT-padded prompt block of width P followed by a RIGHT-padded
completion block of width C, so every completion starts at column P. ``attention_mask`` marks
real tokens with 1. Pads on either side never influence real tokens (they are masked out of
attention), and the log-probs returned at completion pads are meaningless: callers mask them.

Departures: none from the paper, which does not discuss the computation. ``temperature``
divides the logits so that the log-probs can match the sampling distribution when the policy
is sampled at a temperature other than 1 (a choice the paper leaves open).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 4
) -> Tensor:
    # logits (B, T, V), targets (B, T) -> (B, T) float32 log p(target_t).
    # log p = logit[target] - logsumexp(logits): avoids materialising the full (B, T, V)
    # log_softmax. Upcasting chunk by chunk (chunk_size rows) bounds the float32 copy under
    # no_grad (reference pass); with grad, autograd keeps each chunk for logsumexp's backward.
    out = []
    for lg, tg in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True):
        lg = lg.float()  # (b, T, V); no copy when already float32
        if temperature != 1.0:
            lg = lg / temperature
        picked = lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1)  # (b, T)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def completion_logprobs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float = 1.0,
) -> Tensor:
    # sequences, attention_mask (B, P + C) -> (B, C) log-probs of the completion tokens.
    completion_len = sequences.shape[1] - prompt_len
    # Left padding shifts the real tokens right, so positions must count real tokens only;
    # pads get position 0 (they are masked anyway).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {}
    if _accepts_logits_to_keep(model):
        # Only positions P-1 .. P+C-1 are computed (the lm_head is most of the memory); the
        # last one predicts past the end and is dropped below.
        kwargs["logits_to_keep"] = completion_len + 1
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    ).logits
    # Logits at position t predict token t + 1: positions P-1 .. P+C-2 -> (B, C, V).
    logits = logits[:, -(completion_len + 1) : -1]
    return token_logprobs(logits, sequences[:, prompt_len:], temperature)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # where(), not x * mask: masked entries may hold inf/NaN (e.g. log-probs at pads).
    masked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # An empty mask gives 0 instead of NaN (count clamped to 1; masks are 0/1).
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
