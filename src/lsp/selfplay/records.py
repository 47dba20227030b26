"""Typed records that cross module boundaries (no loose dicts of tensors).

Shapes: N queries per step, G answers per query, P prompt tokens (left-padded), C completion
tokens (right-padded). Solver rows are ordered query-major: row i * G + j is answer j to query i.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Sampled completions of one role: prompt tokens then completion tokens."""

    sequences: Tensor  # (B, P + C) left-padded prompt, then the sampled completion
    attention_mask: Tensor  # (B, P + C) 0 on left padding and on tokens after EOS
    prompt_len: int  # P: the completion of every row starts at this column
    completion_mask: Tensor  # (B, C) 1 on sampled tokens up to and including the first EOS
    prompts: list[str]  # B rendered prompts (chat template applied)
    completions: list[str]  # B decoded completions (special tokens stripped)
    truncated: Tensor  # (B,) bool: hit max_new_tokens before EOS
    logprobs: Tensor | None = None  # (B, C) sampling-time policy log-probs, when kept

    @property
    def completion_lengths(self) -> Tensor:  # (B,)
        return self.completion_mask.sum(-1)

    def to(self, device: torch.device | str) -> Rollout:
        """The same rollout with its tensors on `device` (the training passes' device)."""
        fields = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return dataclasses.replace(self, **{name: value.to(device) for name, value in fields
                                            if isinstance(value, Tensor)})


@dataclass
class QueryCheck:
    """Result of the degenerate-query rule applied to the Challenger's raw outputs."""

    queries: list[str]  # N cleaned Challenger queries (invalid ones kept; see `valid`)
    valid: Tensor  # (N,) bool: False for empty / whitespace / over-length / echoing queries
    reasons: list[str]  # N: "" when valid, else the rule that fired

    @property
    def valid_queries(self) -> list[str]:  # Nv queries, in order
        return [q for q, ok in zip(self.queries, self.valid.tolist(), strict=True) if ok]


@dataclass
class RewardOutput:
    values: Tensor  # (B,) float32 scores
    parse_failed: Tensor  # (B,) bool: judge output could not be parsed; value is the fallback
    raw: list[str] = field(default_factory=list)  # judge texts (generate mode), for sample tables


@dataclass
class SelfPlayBatch:
    """Everything one self-play step produced, handed to hooks and callbacks."""

    step: int  # 1-based: the optimiser step this batch makes (= checkpoint/metric step)
    challenger: Rollout | None  # B = N; None when queries come from a prompt file (GRPO)
    check: QueryCheck
    solver: Rollout | None = None  # B = N * G
    rewards: Tensor | None = None  # (N, G) reward-model scores R
    self_rewards: Tensor | None = None  # (N, G) quality self-reward R_Q (LSP only)
    solver_reward: Tensor | None = None  # (N, G) R + w R_Q
    challenger_reward: Tensor | None = None  # (N,) -V + w V_Q
    solver_advantages: Tensor | None = None  # (N, G)
    challenger_advantages: Tensor | None = None  # (N,)
    judge_failures: int = 0  # unparseable judge outputs in this step (reward + self-reward)
    # The constraint environment (lsp.selfplay.constraints), when the reward scores constraints:
    constraints: list | None = None  # Nv lists of Constraint appended to the valid queries
    solver_queries: list[str] | None = None  # Nv queries as the Solver saw them (augmented)
    reward_components: dict[str, Tensor] = field(default_factory=dict)  # name -> (Nv, G)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    @property
    def group_size(self) -> int:
        return 0 if self.rewards is None else self.rewards.shape[1]


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
        logprobs=None if any(r.logprobs is None for r in parts) else torch.cat(
            [_pad_to(r.logprobs, c, 0.0, False) for r in parts]),
    )
