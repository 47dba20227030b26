"""Per-step metrics, slash-namespaced like the RL tools users know (TRL, verl, OpenRLHF)."""

from __future__ import annotations

import torch

from lsp.selfplay.losses import LossStats, total_loss
from lsp.selfplay.records import SelfPlayBatch


def _mean_std(x: torch.Tensor, prefix: str) -> dict[str, float]:
    x = x.float().flatten()
    return {f"{prefix}_mean": x.mean().item(), f"{prefix}_std": x.std(correction=0).item()}


def group_std(x: torch.Tensor) -> float:
    """x (Nv, G), one row per answered query: the mean over queries of the population std within
    the query's group, the spread a group baseline leaves to learn from (the report's "which
    signal drives training"). An overall std also counts the spread between queries."""
    return x.float().std(dim=1, correction=0).mean().item()


def rollout_metrics(sp: SelfPlayBatch) -> dict[str, float]:
    out = {"rollout/invalid_queries": float((~sp.check.valid).sum()), "rollout/answer_len_mean": 0.0}
    if sp.challenger is not None:  # None: queries from a prompt file (GRPO)
        out["rollout/query_len_mean"] = sp.challenger.completion_lengths.float().mean().item()
        out["rollout/query_truncated_frac"] = sp.challenger.truncated.float().mean().item()
    for reason in ("empty", "too_long", "truncated", "echo"):
        out[f"rollout/invalid_{reason}"] = float(sum(r == reason for r in sp.check.reasons))
    if sp.solver is not None:
        out["rollout/answer_len_mean"] = sp.solver.completion_lengths.float().mean().item()
        out["rollout/answer_truncated_frac"] = sp.solver.truncated.float().mean().item()
    return out


def reward_metrics(sp: SelfPlayBatch) -> dict[str, float]:
    out = {}
    if sp.challenger is not None:
        out |= _mean_std(sp.challenger_reward, "challenger/reward")
        out["challenger/advantage_abs_mean"] = sp.challenger_advantages.abs().mean().item()
    if sp.rewards is None:
        return out
    out |= _mean_std(sp.rewards, "solver/reward")
    out |= _mean_std(sp.solver_reward, "solver/total_reward")
    out["solver/advantage_abs_mean"] = sp.solver_advantages.abs().mean().item()
    out["solver/reward_group_std"] = group_std(sp.rewards)
    out["solver/total_reward_group_std"] = group_std(sp.solver_reward)
    # Groups whose answers all scored the same carry no Solver learning signal.
    zero_std = sp.rewards.std(dim=1, correction=0) < 1e-6
    out["rollout/frac_zero_std_groups"] = zero_std.float().mean().item()
    out["judge/parse_failures"] = float(sp.judge_failures)
    for name, values in sp.reward_components.items():  # a composite reward's parts, unweighted
        out[f"reward/{name}_mean"] = values.float().mean().item()
        out[f"reward/{name}_group_std"] = group_std(values)
    if sp.self_rewards is not None:
        out["self_reward/mean"] = sp.self_rewards.mean().item()
        out["self_reward/std"] = sp.self_rewards.std(correction=0).item()
        out["self_reward/group_std"] = group_std(sp.self_rewards)
    return out


def perf_metrics(sp: SelfPlayBatch) -> dict[str, float]:
    t = sp.timings
    generated = 0 if sp.challenger is None else sp.challenger.completion_lengths.sum().item()
    if sp.solver is not None:
        generated += sp.solver.completion_lengths.sum().item()
    out = {f"perf/{phase}_s": seconds for phase, seconds in t.items()}
    out["perf/generated_tokens"] = float(generated)
    out["perf/tokens_per_s"] = generated / max(t.get("step", 0.0), 1e-9)
    return out


def step_metrics(sp: SelfPlayBatch, stats: dict[str, LossStats], alpha_ch: float
                 ) -> dict[str, float]:
    """Every metric of one step: `stats` are the roles' global losses (lsp.selfplay.losses)."""
    out = rollout_metrics(sp) | reward_metrics(sp) | perf_metrics(sp)
    for role, st in stats.items():
        out[f"loss/{role}"] = st.loss
        out[f"kl/{role}"] = st.kl
    out["loss/total"] = total_loss({role: st.loss for role, st in stats.items()}, alpha_ch)
    # Stale-weights canary (lsp.engines): how far the engine's log-probs of its own samples are
    # from the policy's; about 0 up to the engine's precision when the weights are current.
    gaps = {role: (st.logprob_gap, st.tokens) for role, st in stats.items()
            if st.logprob_gap is not None}
    for role, (gap, _) in gaps.items():
        out[f"rollout/logprob_gap_{role}"] = gap
    if gaps:
        tokens = sum(n for _, n in gaps.values())
        out["rollout/logprob_gap"] = sum(g * n for g, n in gaps.values()) / max(tokens, 1)
    return out | engine_weight_metrics(stats)


def engine_weight_metrics(stats: dict[str, LossStats]) -> dict[str, float]:
    """algo.engine_correction's importance weights over both roles' tokens: mean, max, and the
    fraction truncated at the cap (TRL logs the same three)."""
    parts = [(st.engine_weights, st.tokens) for st in stats.values() if st.engine_weights]
    if not parts:
        return {}
    tokens = max(sum(n for _, n in parts), 1)
    return {"rollout/tis_weight_mean": sum(w[0] * n for w, n in parts) / tokens,
            "rollout/tis_weight_max": max(w[1] for w, _ in parts),
            "rollout/tis_truncated_frac": sum(w[2] * n for w, n in parts) / tokens}
