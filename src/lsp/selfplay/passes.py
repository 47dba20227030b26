"""The micro-batched log-prob passes of one role's learning step: the frozen reference's
log-probs and the policy's forward/backward (`lsp.selfplay.module` sequences them).

Both take log-probs under the sampling temperature of the role (logits / T), so the gradient is
on-policy and the KL is between the two tempered distributions; top-k / top-p, under which they
would differ, are refused at the config boundary (lsp.config). Every micro-batch is normalised
by the global batch's counts, so the micro-batches (and the ranks) sum to the full-batch loss
and gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from lsp.models import autocast
from lsp.selfplay import distributed, fsdp, losses
from lsp.selfplay.logprobs import PromptMemo, can_share_prefix, completion_logprobs, masked_sum
from lsp.selfplay.losses import LossStats
from lsp.selfplay.records import Rollout

if TYPE_CHECKING:
    from lsp.selfplay.module import SelfPlaySettings


class RolePass(NamedTuple):
    """One role's share of a learning step on this rank."""

    rollout: Rollout | None  # this rank's rows (B sequences); None: the rank has none
    advantages: Tensor | None  # (B,) per sequence; None with the rollout
    weight: float  # losses.role_weight: the role's weight in the total loss
    temperature: float  # the role's sampling temperature
    counts: tuple[int, int]  # the GLOBAL batch's (sequences, completion tokens) of the role


def micro_batches(n: int, size: int, lengths: Tensor | None = None) -> list[slice | Tensor]:
    """The rows of each micro-batch of at most `size`: slices in order, or with `lengths` (n,)
    index tensors over the rows sorted by length, longest first, so that each micro-batch pads
    to rows of about its own length (every micro-batch is normalised by the whole batch's
    counts, so the order changes no sum, only the float rounding)."""
    if lengths is None or n <= size:
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]
    # on the host: host indices select rows of CUDA tensors too, while CUDA indices cannot
    # select the host tensors (the advantages)
    order = torch.argsort(lengths.cpu(), descending=True, stable=True)  # (n,)
    return [order[i : i + size] for i in range(0, n, size)]


def role_batches(model: nn.Module, rollout: Rollout, s: SelfPlaySettings, share_prefix: bool
                 ) -> list[slice | Tensor]:
    """`micro_batches` of a role's pass: grouped by completion length (`trainer.group_by_length`)
    unless the pass shares prompts, which needs each prompt's rows together and in order."""
    sorted_ok = s.group_by_length and not (share_prefix and can_share_prefix(model))
    lengths = rollout.completion_mask.sum(-1) if sorted_ok else None  # (B,)
    return micro_batches(rollout.sequences.shape[0], s.micro_batch_size, lengths)


@torch.no_grad()
def reference_logprobs(ref: nn.Module, rollout: Rollout, temperature: float,
                       s: SelfPlaySettings, device: torch.device,
                       prompt_memo: PromptMemo | None = None) -> Tensor:
    """(B, C) float32 log-probs of the sampled completion tokens under pi_ref at `temperature`.
    prompt_memo: the role's prompt pass kept between steps (lsp.selfplay.logprobs.PromptMemo)."""
    batches = role_batches(ref, rollout, s, s.share_prefix)
    with autocast(device, s.amp_dtype):
        parts = [
            completion_logprobs(ref, rollout.sequences[mb], rollout.attention_mask[mb],
                                rollout.prompt_len, temperature, share_prefix=s.share_prefix,
                                fused_head=s.fused_lm_head, prompt_memo=prompt_memo)
            for mb in batches
        ]
    out = torch.cat(parts).float()  # (B, C), rows in the micro-batches' order
    if isinstance(batches[0], slice):
        return out
    return out[torch.argsort(torch.cat(batches))]  # back to the rollout's row order


def backward_role(policy: nn.Module, role: RolePass, ref: Tensor | None, s: SelfPlaySettings,
                  device: torch.device, backward: Callable[[Tensor], None]) -> LossStats:
    """Back-propagate `role.weight * L_role` of this rank's rows (ref: their (B, C) reference
    log-probs) through `backward` (the LightningModule's manual_backward), one micro-batch at a
    time; return the role's global loss and KL. Every rank calls it, with or without rows: its
    one collective sums the ranks' shares."""
    rollout, advantages = role.rollout, role.advantages
    n_seq, n_tok = role.counts
    loss_sum, kl_sum = 0.0, 0.0
    engine = EngineTerms()  # the canary's gap and the correction's weights, summed
    mask = None if rollout is None else rollout.completion_mask.float()  # (B, C)
    # Sharded (fsdp): every forward and backward is a collective, so every rank makes the
    # busiest rank's count of passes, and one forward per micro-batch: share_prefix makes one
    # or two depending on the rows (same maths either way, lsp.selfplay.logprobs).
    sharded = fsdp.is_sharded(policy)
    share_prefix = s.share_prefix and not sharded
    batches = [] if rollout is None else role_batches(policy, rollout, s, share_prefix)
    dummies = fsdp.micro_steps(len(batches)) - len(batches) if sharded else 0
    fused_head = s.fused_lm_head and not sharded  # the decoder alone would skip FSDP's root hooks
    for _ in range(dummies):
        with autocast(device, s.amp_dtype):
            zero = fsdp.dummy_loss(policy, device)
        backward(zero)
    for mb in batches:
        with autocast(device, s.amp_dtype):
            logp = completion_logprobs(
                policy, rollout.sequences[mb], rollout.attention_mask[mb],
                rollout.prompt_len, role.temperature, share_prefix=share_prefix,
                fused_head=fused_head,
            ).float()  # (b, C)
        weights = engine.add(logp, rollout.logprobs, mb, mask[mb], s)
        loss, stats = losses.policy_loss(
            logp, ref[mb], advantages[mb].to(logp), mask[mb], s.beta, s.kl_estimator,
            s.kl_placement, s.aggregation, num_sequences=n_seq, num_tokens=n_tok, weights=weights,
        )
        backward(loss * role.weight)
        loss_sum += loss.item()
        kl_sum += stats["kl_sum"].item()  # summed sequence log-ratios of the micro-batch
    # one collective per role on every rank: the global loss, KL, engine gap and weights
    loss_sum, kl_sum, *sums = distributed.all_reduce_sum([loss_sum, kl_sum, *engine.sums()])
    gap, tis = engine.results(sums, n_tok, s.engine_correction != "none")
    return LossStats(loss=loss_sum, kl=kl_sum / max(n_seq, 1), tokens=int(n_tok),
                     logprob_gap=gap, engine_weights=tis)


class EngineTerms:
    """What a role's pass learns from the engine's own log-probs of its samples (none when the
    engine decodes on the policy itself): the stale-weights canary's gap (mean |log p_engine -
    log p_policy| per token) and, with `algo.engine_correction`, the importance weights
    (lsp.selfplay.losses.engine_weights) and their statistics."""

    def __init__(self):
        self.gap = self.has_gap = self.w_sum = self.w_cut = 0.0
        self.w_max = None  # the largest weight of this rank (None: no weights)

    def add(self, logp: Tensor, engine_logp: Tensor | None, mb, mask: Tensor,
            s: SelfPlaySettings) -> Tensor | None:
        """logp (b, C) of micro-batch `mb`; engine_logp (B, C) of the whole rollout or None;
        mask (b, C). Returns the (b, C) weights, or None (no correction)."""
        if engine_logp is None:
            return None
        lp = engine_logp[mb].to(logp)  # (b, C)
        self.gap += masked_sum((logp.detach() - lp).abs(), mask).item()
        self.has_gap = 1.0
        if s.engine_correction == "none":
            return None
        weights, cut = losses.engine_weights(logp, lp, mask, s.engine_correction, s.tis_cap)
        self.w_sum += masked_sum(weights, mask).item()
        self.w_cut += float(cut.sum())
        top = float(weights[mask.bool()].max()) if mask.any() else 0.0
        self.w_max = top if self.w_max is None else max(self.w_max, top)
        return weights

    def sums(self) -> list[float]:
        return [self.gap, self.has_gap, self.w_sum, self.w_cut]

    def results(self, sums: list[float], n_tok: int, corrected: bool
                ) -> tuple[float | None, tuple | None]:
        """(the global gap or None, (mean weight, max weight, truncated fraction) or None) from
        the ranks' summed `sums`; the max is gathered (a collective) only with weights."""
        gap_sum, has_gap, w_sum, w_cut = sums
        gap = gap_sum / max(n_tok, 1) if has_gap else None
        maxima = distributed.gather_objects(self.w_max) if has_gap and corrected else []
        maxima = [m for m in maxima if m is not None]
        if not maxima:
            return gap, None
        return gap, (w_sum / max(n_tok, 1), max(maxima), w_cut / max(n_tok, 1))
