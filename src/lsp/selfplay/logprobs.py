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

import copy
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
    prompt_memo: PromptMemo | None = None,
) -> Tensor:
    # sequences, attention_mask (B, P + C) -> (B, C) log-probs of the completion tokens.
    # Columns that are padding in every row are never computed (their log-probs are 0; masked).
    # share_prefix: consecutive rows with the same prompt (the G answers of one query, the N
    # Challenger samples of one prompt) run that prompt through the model once; its KV cache is
    # repeated for the completions. Same maths as running every row in full (tests check it).
    # fused_head: the LM head and log-softmax run slice by slice over the vocabulary on the real
    # completion tokens only (lsp.selfplay.lm_head), where the model's head allows it.
    # prompt_memo (a frozen model under no_grad only): the prompt pass of share_prefix is kept
    # and reused while the prompts are the same (the Challenger's fixed prompt, every step).
    completion_len = sequences.shape[1] - prompt_len
    lo, hi = _real_columns(attention_mask, prompt_len)
    # Left padding shifts the real tokens right, so positions must count real tokens only;
    # pads get position 0 (they are masked anyway).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    ids, mask, pos = (x[:, lo:hi] for x in (sequences, attention_mask, position_ids))
    p = prompt_len - lo
    groups = prompt_groups(ids, mask, p) if share_prefix and can_share_prefix(model) else None
    targets = ids[:, p:]  # (B, C')
    parts = lm_head.head_parts(model) if fused_head else None
    if parts is None:  # the model's own head: (b, c, V) logits per block of columns
        run = _runner(model, "logits", cache_argument(model), _accepts_logits_to_keep(model))
        blocks, col, out = _position_outputs(run, ids, mask, pos, p, groups, prompt_memo), 0, []
        for x in blocks:  # token_logprobs per block: the (B, C', V) logits are never concatenated
            out.append(token_logprobs(x, targets[:, col : col + x.shape[1]], temperature))
            col += x.shape[1]
        out = torch.cat(out, dim=1)
    else:
        decoder, weight = parts
        run = _runner(decoder, "last_hidden_state", _cache_kwarg(type(decoder)), False)
        hidden = torch.cat(_position_outputs(run, ids, mask, pos, p, groups, prompt_memo),
                           dim=1)  # (B, C', H)
        out = _fused_head_logprobs(hidden, weight, targets, mask[:, p:].bool(), temperature)
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


def _runner(module: nn.Module, output: str, cache_name: str | None, keep_arg: bool):
    """run(ids, mask, pos, keep, use_cache, cache) -> (the `output` of `module` at the last `keep`
    positions (all when None), its KV cache when use_cache). `module` is a causal LM (output
    "logits"; keep_arg: it takes logits_to_keep, so only those positions reach its head) or its
    decoder ("last_hidden_state")."""

    def run(ids, mask, pos, keep=None, use_cache=False, cache=None):
        kwargs = {} if cache is None else {cache_name: cache}
        if keep is not None and keep_arg:
            kwargs["logits_to_keep"] = keep
        res = module(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                     **kwargs)
        x = getattr(res, output)
        return (x if keep is None else x[:, -keep:]), (getattr(res, cache_name) if use_cache else None)

    run.output = output  # what it returns (a PromptMemo keeps one kind only)
    return run


def _position_outputs(run, ids, mask, pos, prompt_len, groups, memo=None) -> list[Tensor]:
    # The model's outputs at positions P-1 .. P+C-2 (the one at t predicts token t + 1), as
    # blocks of columns in order: [(B, C, X)], or with groups (B,) (row -> distinct prompt)
    # [(B, 1, X), (B, C - 1, X)]: a prompt pass over the Q distinct prompts, then the
    # completions (all but their last token) attend to its KV cache repeated per row; autograd
    # sums the rows' gradients into it.
    p, c = prompt_len, ids.shape[1] - prompt_len
    if groups is None:
        out, _ = run(ids, mask, pos, keep=c + 1)  # the last position predicts past the end
        return [out[:, :-1]]
    first = torch.cat([groups.new_ones(1), groups[1:] != groups[:-1]]).nonzero()[:, 0]  # (Q,)
    prompt = (ids[first, :p], mask[first, :p], pos[first, :p])
    if memo is None:
        head, cache = run(*prompt, keep=1, use_cache=True)
    else:
        head, cache = memo.prompt_pass(prompt, lambda: run(*prompt, keep=1, use_cache=True),
                                       run.output)
    blocks = [head[groups]]  # (B, 1, X)
    if c > 1:
        cache.reorder_cache(groups)  # (Q, ...) -> (B, ...)
        tail, _ = run(ids[:, p:-1], mask[:, :-1], pos[:, p:-1], use_cache=True, cache=cache)
        blocks.append(tail)  # (B, C - 1, X)
    return blocks


class PromptMemo:
    """The last prompt pass of a frozen model (its outputs at the prompts' last position and
    their KV cache), reused while the same prompts come again under the same autocast. The
    Challenger's prompt is the same every step and pi_ref never changes, so its reference pass
    runs the prompt once per run instead of once per step (same numbers: a cache hit returns
    the tensors the pass computed). Never for the policy: its weights change every step."""

    def __init__(self):
        self._context: tuple | None = None  # (output, autocast on, its dtype) of the kept pass
        self._prompt: tuple[Tensor, ...] = ()  # its (ids, mask, pos), each (Q, P)
        self._value: tuple[Tensor, object] | None = None  # its (head, KV cache)
        self.hits = 0

    def prompt_pass(self, prompt: tuple[Tensor, Tensor, Tensor], compute, output: str):
        # prompt: (ids, mask, pos) (Q, P); compute() -> (head (Q, 1, X), KV cache), the head
        # being the model's `output` ("logits" or "last_hidden_state")
        # -> the kept or newly computed head, and a copy of the KV cache of its own
        if torch.is_grad_enabled():
            raise RuntimeError("PromptMemo is for a frozen model's passes under no_grad")
        kind = prompt[0].device.type
        context = (output, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        # (the context is set together with the 3 kept tensors; torch.equal is False for
        # other shapes and raises for other devices, hence the device test)
        if context == self._context and all(a.device == b.device and torch.equal(a, b)
                                            for a, b in zip(self._prompt, prompt, strict=True)):
            self.hits += 1
        else:
            self._context, self._prompt = context, tuple(x.clone() for x in prompt)
            self._value = compute()
        head, cache = self._value
        # the caller reorders and appends to the cache in place: it gets its own copy (4 ms
        # for SmolLM2's 295-token prompt against 327 ms for the pass, AMD EPYC Zen 5)
        return head, copy.deepcopy(cache)


def _fused_head_logprobs(hidden, weight, targets, real, temperature) -> Tensor:
    # hidden (B, C, H), targets / real (B, C) -> (B, C): the fused head on the real completion
    # tokens only; pads after EOS get log-prob 0 (callers mask them).
    logp = lm_head.linear_token_logprobs(hidden[real], weight, targets[real], temperature)
    return torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device).masked_scatter(
        real, logp)


def can_share_prefix(model: nn.Module) -> bool:
    """Whether `model`'s passes can take the shared-prompt path now (share_prefix)."""
    # Checkpointed layers drop the KV cache in training mode (transformers'
    # GradientCheckpointingLayer: use_cache=False and no cache), so the prompt pass would have
    # none to hand on; the path also needs the transformers (>= 5) causal-LM interface:
    # logits_to_keep and a KV-cache argument.
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        return False
    return cache_argument(model) is not None


def cache_argument(model: nn.Module) -> str | None:
    """The KV-cache argument (and output attribute) of a transformers (>= 5) causal LM that also
    takes `logits_to_keep`: `past_key_values` (up to 5.2x) or `cache` (later 5.x, where it was
    renamed); None for other models."""
    if "logits_to_keep" not in _forward_parameters(type(model)):
        return None
    return _cache_kwarg(type(model))


def _cache_kwarg(module_class: type) -> str | None:
    params = _forward_parameters(module_class)
    return next((n for n in ("cache", "past_key_values") if n in params), None)


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
