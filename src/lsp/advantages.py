"""Advantages for the two LSP players (paper Sec. 3, Algorithm 1, step 4).

Paper form (no std division, plain mean baselines):
    V(q_i)      = mean_j R(q_i, a_i^j)
    A_sol(i, j) = R(q_i, a_i^j) - V(q_i)                    (group baseline)
    A_ch(i)     = mean_k V(q_k) - V(q_i)                     (batch baseline on reward -V)
LSP adds the quality self-reward R_Q: the Solver's reward is R + w * R_Q and the Challenger's
reward is -V(q_i) + w * V_Q(q_i), with V_Q(q_i) = mean_j R_Q(q_i, a_i^j); each advantage is
still "reward minus its mean". LSP-Zero is the same with R_Q absent.

Departures from the paper, each off by default:
- ``self_reward_weight`` (w): the paper adds R_Q unscaled (w = 1).
- ``scale_std``: divide by the group (Solver) / batch (Challenger) std as GRPO does. We use the
  population std (``correction=0``), not GRPO's unbiased one, so that groups of one answer
  (G = 1) or a batch of one valid query give 0 / eps = 0 instead of NaN.
- ``query_mask``: queries flagged invalid (e.g. degenerate Challenger output) are left out of
  the Challenger's batch mean/std and get advantage 0 for both players, so that they neither
  train the policy nor shift the baseline of the valid queries.
"""

from __future__ import annotations

import torch
from torch import Tensor


def solver_advantages(rewards: Tensor, scale_std: bool = False, eps: float = 1e-6) -> Tensor:
    # rewards (N, G) -> (N, G): each answer against the mean of its own query's group.
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
    return adv


def challenger_advantages(
    challenger_rewards: Tensor,
    scale_std: bool = False,
    eps: float = 1e-6,
    query_mask: Tensor | None = None,
) -> Tensor:
    # challenger_rewards (N,) -> (N,): reward minus the mean over the (valid) queries of the batch.
    valid = _valid(challenger_rewards, query_mask)  # (N,) bool
    # where(), not a product: an invalid query may carry a NaN/inf reward, and NaN * 0 = NaN.
    rewards = torch.where(valid, challenger_rewards, 0.0)
    count = valid.sum().clamp_min(1)  # all-invalid batch: every advantage is 0, not NaN
    adv = torch.where(valid, rewards - rewards.sum() / count, 0.0)
    if scale_std:
        std = ((adv**2).sum() / count).sqrt()  # population std over valid queries
        adv = adv / (std + eps)
    return adv


def lsp_advantages(
    rewards: Tensor,
    self_rewards: Tensor | None = None,
    self_reward_weight: float = 1.0,
    scale_std: bool = False,
    query_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both players' advantages from the reward-model scores (and R_Q for LSP).

    rewards (N, G) from the reward model; self_rewards (N, G) R_Q, or None for LSP-Zero.
    Returns (solver_adv (N, G), challenger_adv (N,), solver_reward (N, G),
    challenger_reward (N,)).
    """
    solver_reward = rewards
    challenger_reward = -rewards.mean(dim=1)  # -V(q_i): the Challenger wants hard queries
    if self_rewards is not None:
        solver_reward = rewards + self_reward_weight * self_rewards
        challenger_reward = challenger_reward + self_reward_weight * self_rewards.mean(dim=1)
    solver_adv = solver_advantages(solver_reward, scale_std=scale_std)
    if query_mask is not None:
        solver_adv = torch.where(query_mask.bool()[:, None], solver_adv, 0.0)
    challenger_adv = challenger_advantages(
        challenger_reward, scale_std=scale_std, query_mask=query_mask
    )
    return solver_adv, challenger_adv, solver_reward, challenger_reward


def _valid(x: Tensor, query_mask: Tensor | None) -> Tensor:
    if query_mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    return query_mask.bool()
