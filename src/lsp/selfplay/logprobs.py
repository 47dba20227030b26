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

import functools
import inspect

import torch
from torch import Tensor, nn

from lsp.selfplay import lm_head


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 4
) -> Tensor:
    # logits (B, T, V), targets (B, T) -> (B, T) log p(target_t), in float32 (or float64).
    # log p = logit[target] - logsumexp(logits), upcast chunk by chunk (chunk_size rows): no full
    # (B, T, V) log_softmax or float32 copy is ever kept. With grad, a fused backward (below)
    # saves only the logits as they came (bf16 under autocast) and the (B, T) logsumexp.
    return _TokenLogProb.apply(logits, targets, temperature, chunk_size)


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out, lse = [], []
        for lg, tg in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True):
            lg = lg.to(dtype)  # (b, T, V)
            if temperature != 1.0:
                lg = lg / temperature
            lse.append(torch.logsumexp(lg, dim=-1))  # (b, T)
            out.append(lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - lse[-1])
        ctx.save_for_backward(logits, targets, torch.cat(lse))
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # d log p(y) / d logit_v = (1[v = y] - softmax_v) / temperature, chunk by chunk, in place.
        logits, targets, lse = ctx.saved_tensors
        dtype = torch.promote_types(logits.dtype, torch.float32)
        parts, n = [], ctx.chunk_size
        for lg, tg, ls, g in zip(logits.split(n), targets.split(n), lse.split(n), grad.split(n),
                                 strict=True):
            g = g.to(dtype).unsqueeze(-1) / ctx.temperature  # (b, T, 1)
            d = lg.to(dtype, copy=True)
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            d.sub_(ls.unsqueeze(-1)).exp_()
            d.mul_(-g).scatter_add_(-1, tg.unsqueeze(-1), g)
            parts.append(d.to(logits.dtype))
        return torch.cat(parts), None, None, None


def completion_logprobs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    share_prefix: bool = True,
    fused_head: bool = True,
) -> Tensor:
    # sequences, attention_mask (B, P + C) -> (B, C) log-probs of the completion tokens.
    # Columns that are padding in every row are never computed (their log-probs are 0; masked).
    # share_prefix: consecutive rows with the same prompt (the G answers of one query, the N
    # Challenger samples of one prompt) run that prompt through the model once; its KV cache is
    # repeated for the completions. Same maths as running every row in full (tests check it).
    # fused_head: the LM head and log-softmax run slice by slice over the vocabulary on the real
    # completion tokens only (lsp.selfplay.lm_head), where the model's head allows it.
    completion_len = sequences.shape[1] - prompt_len
    lo, hi = _real_columns(attention_mask, prompt_len)
    # Left padding shifts the real tokens right, so positions must count real tokens only;
    # pads get position 0 (they are masked anyway).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    ids, mask, pos = (x[:, lo:hi] for x in (sequences, attention_mask, position_ids))
    p = prompt_len - lo
    groups = prompt_groups(ids, mask, p) if share_prefix and _can_share_prefix(model) else None
    parts = lm_head.head_parts(model) if fused_head else None
    if parts is not None:
        out = _fused_logprobs(*parts, ids, mask, pos, p, groups, temperature)
    elif groups is None:
        out = _full_logprobs(model, ids, mask, pos, p, temperature)
    else:
        out = _shared_prefix_logprobs(model, ids, mask, pos, p, groups, temperature)
    return nn.functional.pad(out, (0, completion_len - out.shape[1]))  # (B, C)


def _real_columns(attention_mask: Tensor, prompt_len: int) -> tuple[int, int]:
    # [lo, hi): from the first prompt column with a real token in any row to the last real
    # completion column (at least one completion column, so shapes stay valid).
    used = attention_mask.bool().any(0)  # (P + C,)
    prompt_cols = used[:prompt_len].nonzero()
    lo = int(prompt_cols[0]) if len(prompt_cols) else 0
    comp_cols = used[prompt_len:].nonzero()
    hi = prompt_len + (int(comp_cols[-1]) + 1 if len(comp_cols) else 1)
    return lo, hi


def prompt_groups(sequences: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor | None:
    """(B,) index of each row's prompt among the distinct consecutive prompts, or None when no
    two consecutive rows share one (nothing to gain)."""
    prompts, masks = sequences[:, :prompt_len], attention_mask[:, :prompt_len]
    same = (prompts[1:] == prompts[:-1]).all(-1) & (masks[1:] == masks[:-1]).all(-1)  # (B-1,)
    if not bool(same.any()):
        return None
    new = torch.cat([same.new_ones(1), ~same])  # (B,) True where a new prompt starts
    return new.long().cumsum(0) - 1


def _full_logprobs(model, ids, mask, pos, prompt_len, temperature) -> Tensor:
    completion_len = ids.shape[1] - prompt_len
    kwargs = {}
    if _accepts_logits_to_keep(model):
        # Only positions P-1 .. P+C-1 are computed (the lm_head is most of the memory); the
        # last one predicts past the end and is dropped below.
        kwargs["logits_to_keep"] = completion_len + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                   **kwargs).logits
    # Logits at position t predict token t + 1: positions P-1 .. P+C-2 -> (B, C, V).
    logits = logits[:, -(completion_len + 1) : -1]
    return token_logprobs(logits, ids[:, prompt_len:], temperature)


def _shared_prefix_logprobs(model, ids, mask, pos, prompt_len, groups, temperature) -> Tensor:
    # groups (B,): row -> distinct prompt. Prompt pass over the Q distinct prompts, then the
    # completions (all but their last token, whose logits would predict past the end) attend
    # to the prompt's KV cache repeated per row; autograd sums the rows' gradients into it.
    p = prompt_len
    first = torch.cat([groups.new_ones(1), groups[1:] != groups[:-1]]).nonzero()[:, 0]  # (Q,)
    head = model(input_ids=ids[first, :p], attention_mask=mask[first, :p],
                 position_ids=pos[first, :p], use_cache=True, logits_to_keep=1)
    targets = ids[:, p:]  # (B, C)
    out = [token_logprobs(head.logits[:, -1:][groups], targets[:, :1], temperature)]  # (B, 1)
    if targets.shape[1] > 1:
        name = cache_argument(model)
        cache = getattr(head, name)
        cache.reorder_cache(groups)  # (Q, ...) -> (B, ...)
        tail = model(input_ids=ids[:, p:-1], attention_mask=mask[:, :-1],
                     position_ids=pos[:, p:-1], use_cache=True, **{name: cache}).logits
        out.append(token_logprobs(tail, targets[:, 1:], temperature))  # (B, C - 1)
    return torch.cat(out, dim=1)


def _fused_logprobs(decoder, weight, ids, mask, pos, prompt_len, groups, temperature) -> Tensor:
    # The decoder's last hidden states (B, C, H) at positions P-1 .. P+C-2 (each predicts the
    # next token), with the prompt run once per distinct prompt when groups is given (as
    # _shared_prefix_logprobs); then the fused head on the real completion tokens only.
    p, targets = prompt_len, ids[:, prompt_len:]  # (B, C)
    if groups is None:
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=False).last_hidden_state[:, p - 1 : -1]
    else:
        first = torch.cat([groups.new_ones(1), groups[1:] != groups[:-1]]).nonzero()[:, 0]
        name = _cache_name(type(decoder))
        head = decoder(input_ids=ids[first, :p], attention_mask=mask[first, :p],
                       position_ids=pos[first, :p], use_cache=True)
        hidden = head.last_hidden_state[:, -1:][groups]  # (B, 1, H)
        if targets.shape[1] > 1:
            cache = getattr(head, name)
            cache.reorder_cache(groups)  # (Q, ...) -> (B, ...)
            tail = decoder(input_ids=ids[:, p:-1], attention_mask=mask[:, :-1],
                           position_ids=pos[:, p:-1], use_cache=True, **{name: cache})
            hidden = torch.cat([hidden, tail.last_hidden_state], dim=1)  # (B, C, H)
    real = mask[:, p:].bool()  # (B, C): pads after EOS get log-prob 0 (callers mask them)
    logp = lm_head.linear_token_logprobs(hidden[real], weight, targets[real], temperature)
    return torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device).masked_scatter(
        real, logp)


def _can_share_prefix(model: nn.Module) -> bool:
    # Gradient checkpointing turns the KV cache off in training; the path needs the
    # transformers (>= 5) causal-LM interface: logits_to_keep and a KV-cache argument.
    if torch.is_grad_enabled() and getattr(model, "is_activation_checkpointing", False):
        return False
    return cache_argument(model) is not None


def cache_argument(model: nn.Module) -> str | None:
    """The KV-cache argument (and output attribute) of a transformers (>= 5) causal LM that also
    takes `logits_to_keep`: `past_key_values` (up to 5.2x) or `cache` (later 5.x, where it was
    renamed); None for other models."""
    params = _forward_parameters(type(model))
    if "logits_to_keep" not in params:
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


@functools.cache
def _cache_name(decoder_class: type) -> str:
    params = _forward_parameters(decoder_class)
    return next((n for n in ("cache", "past_key_values") if n in params), "past_key_values")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # where(), not x * mask: masked entries may hold inf/NaN (e.g. log-probs at pads).
    masked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # An empty mask gives 0 instead of NaN (count clamped to 1; masks are 0/1).
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _forward_parameters(type(model))


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    # Which arguments a model's forward takes is a fact of its class: probed once per class
    # (cached), only to pass the arguments it has (logits_to_keep, the cache's name) or take the
    # shared-prefix path of the same maths; never to switch engines (the `lsp` engine's need for a
    # KV-cache argument is checked once, when it is built: lsp.engines.own.TorchEngine).
    return frozenset(inspect.signature(model_class.forward).parameters)
