"""The engine-mismatch correction (`algo.engine_correction`, lsp.selfplay.losses.engine_weights),
checked exactly by enumerating every sequence of a tiny policy.

The policy pi is a softmax-parameterised table over a vocabulary of 3 and sequences of exactly 2
tokens (9 sequences): pi(y1) = softmax(theta1), pi(y2 | y1) = softmax(theta2[y1]). The engine
samples from another such table q (as a bf16 engine samples from a distribution slightly off the
fp32 policy). For a per-sample loss l(y) (the training loss of one sampled sequence: advantage
plus the KL term, from `policy_loss`), the estimator's expected gradient under the sampler is
sum_y q(y) grad l_w(y), with the weights w computed from pi and q exactly as in training; the
on-policy target is sum_y pi(y) grad l(y).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lsp.selfplay.losses import engine_weights, policy_loss

V = 3
SEQS = list(itertools.product(range(V), range(V)))  # the 9 sequences (y1, y2)
ADV = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.0, 0.5, -2.0, 1.5], dtype=torch.float64)


def _table(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta1 = (scale * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_()
    theta2 = (scale * torch.randn(V, V, generator=g, dtype=torch.float64)).requires_grad_()
    return theta1, theta2


def _token_logp(table) -> torch.Tensor:
    # (9, 2) log-probs of each sequence's two tokens under the table
    theta1, theta2 = table
    first = theta1.log_softmax(-1)  # (V,)
    second = theta2.log_softmax(-1)  # (V, V): row y1
    return torch.stack([torch.stack([first[a], second[a, b]]) for a, b in SEQS])


def _grad(loss, table) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(table))])


def expected_gradient(pi, q, mode: str, cap: float, beta: float = 0.3) -> torch.Tensor:
    """sum_y q(y) grad l_w(y): the corrected estimator's expected gradient when q samples."""
    logp = _token_logp(pi)  # (9, 2), with grad
    with torch.no_grad():
        logq = _token_logp(q)
        ref = _token_logp(_table(7))  # pi_ref, for the KL term
    mask = torch.ones(len(SEQS), 2, dtype=torch.float64)
    weights, _ = engine_weights(logp, logq, mask, mode, cap)
    sample_prob = logq.sum(-1).exp()  # (9,) q(y), constants
    total = 0.0
    for s in range(len(SEQS)):
        loss, _ = policy_loss(logp[s : s + 1], ref[s : s + 1], ADV[s : s + 1], mask[s : s + 1],
                              beta, weights=None if mode == "none" else weights[s : s + 1])
        total = total + sample_prob[s] * loss
    return _grad(total, pi)


def on_policy_gradient(pi, beta: float = 0.3) -> torch.Tensor:
    """sum_y pi(y) grad l(y): the same estimator sampled from pi itself."""
    return expected_gradient(pi, tuple(t.detach() for t in pi), "none", 1.0, beta)


def _max_ratio(pi, q) -> float:
    with torch.no_grad():
        return (_token_logp(pi).sum(-1) - _token_logp(q).sum(-1)).exp().max().item()


@pytest.fixture(scope="module")
def tables():
    return _table(0), _table(1, scale=0.5)  # pi, and a sampler q far enough to matter


def test_the_on_policy_target_is_the_true_gradient(tables):
    # sanity of the harness: with q = pi the estimator's expectation is grad E_pi[A] + the KL's
    pi, _ = tables
    logp = _token_logp(pi).sum(-1)
    with torch.no_grad():
        ref = _token_logp(_table(7)).sum(-1)
    objective = -(logp.exp() * ADV).sum() + 0.3 * (logp.exp() * (logp - ref)).sum()
    torch.testing.assert_close(on_policy_gradient(pi), _grad(objective, pi), rtol=0, atol=1e-12)


def test_tis_is_exact_when_the_cap_covers_every_ratio(tables):
    pi, q = tables
    target = on_policy_gradient(pi)
    cap = _max_ratio(pi, q) * 1.01
    assert cap > 1.5  # q is really off-policy
    corrected = expected_gradient(pi, q, "tis", cap)
    assert (corrected - target).abs().max() < 1e-12
    uncorrected = expected_gradient(pi, q, "none", cap)
    assert (uncorrected - target).norm() > 0.1 * target.norm()  # without it: biased


def test_a_cap_below_the_largest_ratio_and_per_token_weights_are_biased(tables):
    pi, q = tables
    target = on_policy_gradient(pi)
    truncated = expected_gradient(pi, q, "tis", _max_ratio(pi, q) / 2)
    assert (truncated - target).norm() > 1e-3 * target.norm()
    # TRL's per-token form: the prefix and the later tokens stay q's
    per_token = expected_gradient(pi, q, "tis_token", 1e6)
    assert (per_token - target).norm() > 1e-3 * target.norm()


def test_engine_weights_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    # per token: 0.5/0.25 = 2 -> capped at 1.5; 0.25/0.5 = 0.5; pad -> 1
    w, cut = engine_weights(logp, engine, mask, "tis_token", 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0]]))
    assert cut.tolist() == [[True, False, False]]
    # per sequence: 2 * 0.5 = 1 on both real tokens, nothing truncated
    w, cut = engine_weights(logp, engine, mask, "tis", 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0]]))
    assert not cut.any()
    # a huge log-ratio does not overflow: exactly the cap
    w, cut = engine_weights(torch.tensor([[0.0]]), torch.tensor([[-1e4]]), torch.ones(1, 1),
                            "tis", 2.0)
    assert w.item() == 2.0 and cut.item() and math.isfinite(w.item())
    w, _ = engine_weights(logp, engine, mask, "none", 1.5)
    assert (w == 1).all()


def test_weights_scale_the_gradient_and_leave_the_kl_stat_alone():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.4, 0.3]]))
    mask, adv = torch.ones(1, 2), torch.tensor([2.0])
    plain, stats = policy_loss(logp, ref, adv, mask, beta=0.0)
    (g_plain,) = torch.autograd.grad(plain, logp)
    weighted, wstats = policy_loss(logp, ref, adv, mask, beta=0.0,
                                   weights=torch.tensor([[0.5, 2.0]]))
    (g_weighted,) = torch.autograd.grad(weighted, logp)
    # d(-A * w_t * logp_t)/d logp_t = -A w_t: -2 * [0.5, 2] = [-1, -4]; unweighted [-2, -2]
    torch.testing.assert_close(g_plain, torch.tensor([[-2.0, -2.0]]))
    torch.testing.assert_close(g_weighted, torch.tensor([[-1.0, -4.0]]))
    assert wstats["kl"] == stats["kl"]
