"""Log-probs of target tokens straight from the last hidden states: the LM head fused with the
log-softmax, one vocabulary slice at a time (`model.fused_lm_head`, issue 10).

The plain path (`lsp.selfplay.logprobs.token_logprobs`) runs the model's LM head over every
position, keeps the (rows, V) logits for the backward and builds a (rows, V) gradient: with
SmolLM2's 49,152-token vocabulary and 16 x 63 completion positions that is ~100 MB in bf16 (by
arithmetic) per role and micro-batch, plus float32 copies of it chunk by chunk, all allocated
afresh each step. Here the logits of a vocabulary slice of at most
`_SLICE_ELEMENTS` entries are computed, reduced and dropped:
- forward: per slice, logits = h @ W_slice^T in the compute dtype (as autocast's linear would),
  upcast to float32, divided by the temperature; a running logsumexp and the target's logit;
- backward: the slice's logits are recomputed (one extra (rows, H) x (H, V) product), and
  d logit = (1[v = y] - softmax_v) * g / T gives dh (summed over slices in float32) and dW_slice.
Only real completion tokens are passed in (`lsp.selfplay.logprobs` drops the padding), and only
(rows, H) hidden states and (rows,) logsumexps are kept for the backward.

Same maths as the plain path: the same bf16 logits (the same products of the same bf16
operands, up to the order in which the matrix library sums a narrower product), the same float32
log-softmax, the same gradient formula; otherwise they differ only in the order of float32 sums
(tests/test_lm_head.py states the tolerances; benchmarks/bench_lm_head.py measures the speed). Used for the causal LMs whose head is
a plain bias-free linear layer on the last hidden state (`_PLAIN_HEAD_TYPES`); every other model,
and a sharded policy (its root parameters are gathered by its own forward), takes the plain path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# transformers model types whose `ForCausalLM.forward` computes `lm_head(hidden_states)` and
# nothing more (no logit scaling or soft-capping): there `decoder + fused head` = `model(...)`.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# float32 elements of one vocabulary slice's logits (16 MiB, for up to 4,096 rows): bounded
# memory whatever the vocabulary; on CPU the slices come from the kept heap
# (lsp.selfplay.runtime.configure_cpu_allocator) instead of fresh mappings.
_SLICE_ELEMENTS = 1 << 22
_MIN_SLICE = 1024


def head_parts(model: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """(decoder, head weight (V, H)) of a causal LM with a plain linear head, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if not (hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")):
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    return model.get_decoder(), head.weight


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the LM head's product runs in: autocast's when it is on, else the weight's."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor,
                          temperature: float = 1.0) -> Tensor:
    # hidden (N, H), weight (V, H), targets (N,) -> (N,) float32 (float64) log p(target) under
    # softmax(hidden @ weight^T / temperature), the product in compute_dtype(weight).
    dtype = compute_dtype(weight)
    return _LinearTokenLogProb.apply(hidden, weight, targets, temperature, dtype)


def _slices(vocab: int, rows: int) -> list[slice]:
    width = min(vocab, max(_MIN_SLICE, _SLICE_ELEMENTS // max(rows, 1)))
    return [slice(v, min(v + width, vocab)) for v in range(0, vocab, width)]


def _slice_logits(h: Tensor, w: Tensor, temperature: float) -> Tensor:
    # h (N, H), w (Vs, H), both in the compute dtype -> (N, Vs) logits / T in float32 (float64
    # for float64 inputs). The product is rounded to the compute dtype first, exactly as the
    # model's own (autocast) head.
    z = (h @ w.T).to(torch.promote_types(h.dtype, torch.float32))
    return z.div_(temperature) if temperature != 1.0 else z


class _LinearTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h, n = hidden.to(dtype), hidden.shape[0]  # (N, H)
            acc = torch.promote_types(dtype, torch.float32)
            lse = torch.full((n,), -torch.inf, dtype=acc, device=h.device)
            target_logit = torch.zeros(n, dtype=acc, device=h.device)
            for s in _slices(weight.shape[0], n):
                z = _slice_logits(h, weight[s].to(dtype), temperature)  # (N, Vs)
                lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
                inside = (targets >= s.start) & (targets < s.stop)  # (N,)
                local = (targets - s.start).clamp(0, z.shape[1] - 1)
                target_logit += torch.where(inside, z.gather(1, local[:, None])[:, 0], 0.0)
        # the weight itself, not a cast copy: each slice is cast again in the backward (a whole
        # (V, H) copy would be a fresh allocation, page-faulted in, per call)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.hidden_dtype = temperature, hidden.dtype
        return target_logit - lse  # (N,)

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        t = ctx.temperature
        acc = lse.dtype
        g = grad.to(acc) / t  # (N,): d log p / d z_v = (1[v = y] - p_v), z = logits / T
        rows = torch.arange(h.shape[0], device=h.device)
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device)  # (N, H)
        want_w = ctx.needs_input_grad[1]
        grad_w = torch.empty_like(weight) if want_w else None  # (V, H)
        with torch.autocast(h.device.type, enabled=False):
            for s in _slices(weight.shape[0], h.shape[0]):
                w = weight[s].to(h.dtype)  # (Vs, H) in the compute dtype
                d = _slice_logits(h, w, t).sub_(lse[:, None]).exp_().mul_(-g[:, None])
                inside = (targets >= s.start) & (targets < s.stop)
                d.index_put_((rows[inside], targets[inside] - s.start), g[inside],
                             accumulate=True)
                d = d.to(h.dtype)  # the logits' gradient in their own dtype, as autocast's head
                grad_h += d @ w  # (N, H)
                if want_w:
                    grad_w[s] = d.T @ h  # (Vs, H)
        return grad_h.to(ctx.hidden_dtype), grad_w, None, None, None
