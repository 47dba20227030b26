"""Policy-gradient losses for both LSP players (paper Sec. 3, Algorithm 1, step 5).

Paper form (sg = stop-gradient; pi/sg(pi) is 1 in value with gradient grad log pi, i.e.
on-policy REINFORCE with a baseline; no PPO clipping, one gradient step per iteration):
    L_sol = -1/(N G) sum_ij [ pi(a|q)/sg(pi(a|q)) A_sol(i,j) - beta log(pi(a|q)/pi_ref(a|q)) ]
    L_ch  = -1/N     sum_i  [ pi(q|cp)/sg(pi(q|cp)) A_ch(i) - beta log(pi(q|cp)/pi_ref(q|cp)) ]
    L     = L_sol + alpha_ch L_ch
Sequence log-probs are sums of token log-probs, so with kl_placement="loss" ``policy_loss`` is
exactly L_sol (or L_ch) for a flattened batch of B = N*G (or N) sequences; with the default
"reward" its policy-gradient part is the same and its KL part is a surrogate whose gradient
actually regularises (below; its value is not the KL: read the KL from the returned stats).

Left open by the paper: the weight alpha_ch, how tokens are aggregated (the sequence form
above implies a per-sequence SUM over tokens), and any KL estimator other than the sampled
log-ratio.

Named options. Defaults follow the paper's INTENT; the KL term's default departs from its
formula as written, because that formula does not do what the paper says it does:
- ``kl_placement``:
  "reward" (DEFAULT): the detached k1 log-ratio is a per-token reward penalty. Token t's
  advantage becomes A - beta * sum_{s >= t} k1_s (reward-to-go; earlier tokens' terms have zero
  expected contribution, so dropping them lowers variance without bias). Its expected gradient
  is exactly beta * grad KL(pi || pi_ref) over whole sequences, as in PPO-RLHF:
  grad KL = E_y[grad log pi(y) * log(pi(y)/pi_ref(y))] (the extra E[grad log pi] term is 0).
  tests/test_kl_gradient.py checks this by enumerating every sequence of a tiny policy.
  "loss": the paper's formula as written: zero expected gradient. The estimator is
  differentiated inside the loss; for k1 its gradient is beta * grad log pi(sampled sequence),
  whose expectation under pi is 0 (E[grad log pi] = 0), so on average it does not pull pi
  towards pi_ref at all and only adds noise. (In the loss, k2's expected per-token gradient is
  that of each position's next-token KL(pi || pi_ref), k3's that of KL(pi_ref || pi), the other
  direction; both ignore how the prefix depends on theta, i.e. the later tokens' terms, so
  neither is the sequence-KL gradient.)
- ``kl_estimator`` (per-token sample estimate of KL(pi || pi_ref), x = ref_logp - logp):
  "k1" = -x, the paper's log-ratio (default); "k2" = x^2 / 2; "k3" = exp(x) - x - 1
  (Schulman's non-negative, low-variance estimator, used by GRPO/TRL in the loss). With
  placement "reward" only "k1" is allowed: k2/k3 as rewards would miss their own
  non-vanishing gradient terms.
- ``aggregation`` (see ``aggregate``): "seq_sum" (paper, default), "token_mean" (DAPO),
  "seq_mean" (GRPO). Only "seq_sum" keeps the exact expected gradients above: the other two
  weight each sequence by a function of its length, i.e. of the sample. With "seq_sum" the
  ratio is one per SEQUENCE as in the paper, so the policy-gradient VALUE (not only its
  gradient) is the paper's; summing per-token ratios would count each advantage once per token.
- ``alpha_ch`` (``role_weight``, ``total_loss``): not given by the paper; default 1.0, the
  unweighted sum. The one definition of the weighting: the module back-propagates
  ``role_weight(role) * L_role`` and the metrics log ``total_loss`` of the same losses.
- ``engine_correction`` (``engine_weights``; not in the paper, default "none"): the rollout
  engine (vLLM in bf16) samples from q, a slightly different distribution than the policy pi
  that trains (fp32), so the estimator is a little off-policy. "tis" weights every term of a
  sequence by its truncated importance ratio min(pi(y)/q(y), cap): with cap >= the largest
  ratio its expected gradient is exactly the on-policy one (tests/test_engine_correction.py
  enumerates a tiny policy). "tis_token" is TRL's per-token form min(pi_t/q_t, cap): lower
  variance over long answers, but not exact (the prefix and the later tokens that the
  advantage depends on stay q's); the same test shows its bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lsp.selfplay.logprobs import masked_mean, masked_sum

if TYPE_CHECKING:
    from lsp.selfplay.records import Rollout

KL_ESTIMATORS = ("k1", "k2", "k3")
ENGINE_CORRECTIONS = ("none", "tis", "tis_token")
KL_PLACEMENTS = ("loss", "reward")
AGGREGATIONS = ("seq_sum", "token_mean", "seq_mean")


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    # logp, ref_logp (B, C) -> (B, C) per-token estimate of KL(pi || pi_ref).
    return _kl_from_log_ratio(logp - ref_logp, estimator)


def _kl_from_log_ratio(log_ratio: Tensor, estimator: str) -> Tensor:
    # log_ratio = logp - ref_logp, (B, C)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
) -> Tensor:
    """Reduce (B, C) per-token terms to a scalar.

    Pass the FULL batch's ``num_sequences`` / ``num_tokens`` when ``per_token`` is a
    micro-batch: the micro-batch results then sum to the full-batch value (and gradient).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    if num_sequences is None:
        num_sequences = per_token.shape[0]
    if mode == "seq_sum":  # 1/B sum_i sum_t: the paper's sequence-level form
        return masked_sum(per_token, mask) / num_sequences
    if mode == "seq_mean":  # 1/B sum_i mean_t: each sequence weighs the same, whatever its length
        return masked_mean(per_token, mask, dim=-1).sum() / num_sequences
    if num_tokens is None:  # token_mean: every token weighs the same
        num_tokens = mask.bool().sum().clamp_min(1)
    return masked_sum(per_token, mask) / num_tokens


def policy_loss(
    logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    beta: float,
    kl_estimator: str = "k1",
    kl_placement: str = "reward",
    aggregation: str = "seq_sum",
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE loss with a KL(pi || pi_ref) penalty for one player.

    logp (B, C) with grad; ref_logp (B, C) frozen; advantages (B,) per sequence; mask (B, C).
    weights (B, C), detached: importance weights (``engine_weights``) multiplying every
    per-token gradient term, the KL's too (it is an expectation under pi as well); None: 1.
    Returns (scalar loss, detached scalar stats). Stats "kl" / "kl_sum": the mean / sum over the
    B sequences of the summed token log-ratio (the paper's k1 sequence KL), whatever the
    placement and estimator: with placement "reward" the loss value is not the KL.
    """
    mask = mask.bool()
    # Pads are zeroed before any exp(): an inf there would turn the masked gradient into NaN.
    logp = torch.where(mask, logp, 0.0)  # (B, C)
    log_ratio = torch.where(mask, logp - ref_logp, 0.0)  # (B, C)
    adv = advantages.detach().to(logp.dtype)[:, None].expand_as(logp)  # (B, C)
    w = None if weights is None else torch.where(mask, weights.detach().to(logp.dtype), 0.0)

    def agg(x: Tensor) -> Tensor:
        return aggregate(x, mask, aggregation, num_sequences, num_tokens)

    pg_loss = -agg(_reinforce(logp, adv, mask, aggregation, w))
    kl_loss = agg(_kl_term(logp, log_ratio, mask, beta, kl_estimator, kl_placement, aggregation,
                           w))
    kl_seq = masked_sum(log_ratio, mask, dim=-1)  # (B,) the paper's sequence log-ratio
    stats = {
        "pg_loss": pg_loss,
        "kl_loss": kl_loss,
        "kl": kl_seq.mean(),
        "kl_sum": kl_seq.sum(),  # micro-batches sum to the full batch's (the module's KL metric)
        "kl_token_mean": masked_mean(log_ratio, mask),
        "entropy_proxy": -masked_mean(logp, mask),
    }
    return pg_loss + kl_loss, {k: v.detach() for k, v in stats.items()}


def _reinforce(logp: Tensor, adv: Tensor, mask: Tensor, aggregation: str,
               w: Tensor | None = None) -> Tensor:
    # (B, C) surrogate with gradient w_t * adv_t * grad logp_t (ratio pi/sg(pi): value 1);
    # w (B, C) importance weights, None: 1.
    ratio = torch.exp(logp - logp.detach())
    if w is not None:
        adv = adv * w
    if aggregation != "seq_sum":
        return ratio * adv
    # The paper's ratio is per SEQUENCE, so its term pi/sg(pi) * A has value A, while summing
    # per-token ratios would give A * length. Same gradient; spread A over the tokens instead
    # so that the loss VALUE is the paper's too.
    lengths = mask.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    return (ratio - 1.0) * adv + adv / lengths


def _kl_term(
    logp: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    beta: float,
    estimator: str,
    placement: str,
    aggregation: str,
    w: Tensor | None = None,
) -> Tensor:
    # (B, C) per-token KL part of the loss (ADDED to the negated pg term); w: as _reinforce's.
    if placement == "loss":
        kl = beta * _kl_from_log_ratio(log_ratio, estimator)
        return kl if w is None else kl * w
    if placement != "reward":
        raise ValueError(f"unknown kl_placement {placement!r}; expected one of {KL_PLACEMENTS}")
    if estimator != "k1":
        raise ValueError(f"kl_placement='reward' needs kl_estimator='k1', got {estimator!r}")
    # Reward-to-go of the per-token penalty, sum_{s >= t} log_ratio_s, detached (a reward),
    # enters like a negative advantage.
    to_go = log_ratio.detach().flip(-1).cumsum(-1).flip(-1)  # (B, C)
    return -_reinforce(logp, -beta * to_go, mask, aggregation, w)


def engine_weights(logp: Tensor, engine_logp: Tensor, mask: Tensor, mode: str, cap: float
                   ) -> tuple[Tensor, Tensor]:
    """Truncated importance weights of sampled tokens for the engine's mismatch (module doc).

    logp (B, C): the policy's log-probs of the sampled tokens (the training pass); engine_logp
    (B, C): the engine's log-probs of the same tokens under the distribution it sampled from;
    mask (B, C). Returns (weights (B, C), truncated (B, C) bool), both detached; pads: weight 1,
    not truncated. "tis": one weight per sequence, min(exp(sum_t logp_t - engine_logp_t), cap),
    on each of its tokens; "tis_token": min(exp(logp_t - engine_logp_t), cap) per token;
    "none": ones. The log-ratio is clamped at log(cap) before exp, so no ratio overflows."""
    mask = mask.bool()
    if mode == "none":
        return torch.ones_like(logp), torch.zeros_like(mask)
    if mode not in ENGINE_CORRECTIONS:
        raise ValueError(f"unknown engine_correction {mode!r}; expected one of {ENGINE_CORRECTIONS}")
    log_ratio = torch.where(mask, logp.detach() - engine_logp.detach(), 0.0)  # (B, C)
    if mode == "tis":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)  # (B, C) per sequence
    truncated = (log_ratio > math.log(cap)) & mask
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
    return torch.where(mask, weights, 1.0), truncated


def role_weight(role: str, alpha_ch: float) -> float:
    """The weight of a role's loss in L = L_sol + alpha_ch L_ch (alpha_ch: not in the paper)."""
    return alpha_ch if role == "challenger" else 1.0


def total_loss(role_losses: Mapping[str, float], alpha_ch: float) -> float:
    """L = sum over the roles present of role_weight * L_role (a role without rows is absent)."""
    return sum((loss * role_weight(role, alpha_ch) for role, loss in role_losses.items()), 0.0)


def role_counts(rollout: Rollout) -> tuple[int, int]:
    """(sequences, completion tokens) of a role's global rollout: its loss normalisers."""
    return rollout.sequences.shape[0], int(rollout.completion_mask.sum())


@dataclass
class LossStats:
    """One role's detached results of a step's forward/backward, summed over ranks."""

    loss: float  # L_role (unweighted by alpha_ch)
    kl: float  # mean over sequences of the summed token log-ratio (the paper's k1 KL)
    tokens: int  # completion tokens of the role in the global batch
    # mean |log p_engine - log p_policy| over sampled tokens; None: the engine is the policy
    logprob_gap: float | None = None
    # algo.engine_correction's weights: (mean over tokens, max, fraction truncated); None: off
    engine_weights: tuple[float, float, float] | None = None
