import itertools
import math

import pytest
import torch

from lsp.selfplay.advantages import lsp_advantages
from lsp.selfplay.losses import aggregate, kl_penalty, policy_loss, role_weight, total_loss

# A tiny batch used by the hand-computed tests: B = 2 sequences, C = 3 token slots.
LOGP = [[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]]
REF = [[-1.5, -2.0, -2.0], [-1.0, -1.0, 0.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]  # second sequence has 2 real tokens
ADV = [2.0, -1.0]
BETA = 0.1
# log-ratio logp - ref = [[0.5, 0, -1], [0.5, -0.5, (pad)]] -> sequence k1 = [-0.5, 0.0]


def _tiny():
    logp = torch.tensor(LOGP, requires_grad=True)
    return logp, torch.tensor(REF), torch.tensor(ADV), torch.tensor(MASK)


def test_kl_penalty_estimators_hand_computed():
    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, 0.0]])
    # log-ratio r = logp - ref = [0.5, -1]; x = ref - logp = [-0.5, 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    k3 = [math.exp(-0.5) + 0.5 - 1.0, math.exp(1.0) - 1.0 - 1.0]  # e^x - x - 1
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([k3]))


def test_kl_penalty_k3_non_negative_and_zero_at_equality():
    logp, ref = torch.randn(4, 7), torch.randn(4, 7)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    torch.testing.assert_close(kl_penalty(logp, logp, "k3"), torch.zeros(4, 7))


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError, match="k7"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k7")


def test_aggregate_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor(MASK)
    # seq_sum: (1+2+3 + 4+5) / 2 sequences = 7.5 (the 100 is a pad)
    torch.testing.assert_close(aggregate(x, mask, "seq_sum"), torch.tensor(7.5))
    # token_mean: 15 / 5 tokens = 3
    torch.testing.assert_close(aggregate(x, mask, "token_mean"), torch.tensor(3.0))
    # seq_mean: (6/3 + 9/2) / 2 = (2 + 4.5) / 2 = 3.25
    torch.testing.assert_close(aggregate(x, mask, "seq_mean"), torch.tensor(3.25))
    # explicit full-batch counts override the local ones
    torch.testing.assert_close(aggregate(x, mask, "seq_sum", num_sequences=5), torch.tensor(3.0))
    torch.testing.assert_close(aggregate(x, mask, "token_mean", num_tokens=10), torch.tensor(1.5))
    with pytest.raises(ValueError, match="seq_max"):
        aggregate(x, mask, "seq_max")


@pytest.mark.parametrize(
    ("aggregation", "pg_loss", "kl_loss"),
    [
        # pg: the ratio is 1, so seq_sum (one ratio per sequence) counts each advantage once,
        # token_mean counts it once per token (2*3 - 1*2 = 4 over 5 tokens).
        # kl: BETA * sequence k1 [-0.5, 0].
        ("seq_sum", -(2.0 - 1.0) / 2, BETA * (-0.5 + 0.0) / 2),
        ("token_mean", -(6.0 - 2.0) / 5, BETA * (-0.5) / 5),
        ("seq_mean", -(2.0 - 1.0) / 2, BETA * (-0.5 / 3 + 0.0 / 2) / 2),
    ],
)
def test_policy_loss_hand_computed(aggregation, pg_loss, kl_loss):
    # The paper's formula as written (kl_placement="loss"): its VALUE is L_sol / L_ch.
    logp, ref, adv, mask = _tiny()
    loss, stats = policy_loss(logp, ref, adv, mask, BETA, kl_placement="loss",
                              aggregation=aggregation)
    torch.testing.assert_close(loss, torch.tensor(pg_loss + kl_loss))
    torch.testing.assert_close(stats["pg_loss"], torch.tensor(pg_loss))
    torch.testing.assert_close(stats["kl_loss"], torch.tensor(kl_loss))
    torch.testing.assert_close(stats["kl"], torch.tensor(-0.25))  # mean of [-0.5, 0]
    torch.testing.assert_close(stats["kl_sum"], torch.tensor(-0.5))  # sum of [-0.5, 0]
    torch.testing.assert_close(stats["kl_token_mean"], torch.tensor(-0.1))  # -0.5 / 5
    # -(-1 - 2 - 3 - 0.5 - 1.5) / 5 = 1.6
    torch.testing.assert_close(stats["entropy_proxy"], torch.tensor(1.6))
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_default_reward_placement_hand_computed():
    logp, ref, adv, mask = _tiny()
    loss, _ = policy_loss(logp, ref, adv, mask, BETA)  # the default: kl_placement="reward"
    loss.backward()
    # reward-to-go of the log-ratio: seq 0 [0.5, 0, -1] -> [-0.5, -1, -1];
    # seq 1 [0.5, -0.5] -> [0, -0.5].
    # per-token advantage A - BETA * to_go: seq 0 [2.05, 2.1, 2.1], seq 1 [-1.0, -0.95]
    # seq_sum value: each sequence counts the mean of its per-token advantages once:
    # loss = -(6.25 / 3 - 1.95 / 2) / 2; grad = -(per-token advantage) / B, 0 at the pad
    torch.testing.assert_close(loss, torch.tensor(-(6.25 / 3 - 1.95 / 2) / 2))
    expected = -torch.tensor([[2.05, 2.1, 2.1], [-1.0, -0.95, 0.0]]) / 2
    torch.testing.assert_close(logp.grad, expected)


def test_policy_loss_option_errors():
    logp, ref, adv, mask = _tiny()
    with pytest.raises(ValueError, match="k1"):
        policy_loss(logp, ref, adv, mask, BETA, kl_estimator="k3", kl_placement="reward")
    with pytest.raises(ValueError, match="advantage"):
        policy_loss(logp, ref, adv, mask, BETA, kl_placement="advantage")
    with pytest.raises(ValueError, match="k9"):
        policy_loss(logp, ref, adv, mask, BETA, kl_estimator="k9")


def test_pg_gradient_is_advantage_times_grad_logp():
    logp, ref, adv, mask = _tiny()
    loss, _ = policy_loss(logp, ref, adv, mask, beta=0.0)
    loss.backward()
    # d/d logp_bt of -1/B sum_b A_b sum_t logp_bt = -A_b / B on real tokens
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / 2)


def test_k1_in_loss_gradient_is_beta_grad_logp():
    logp, ref, _, mask = _tiny()
    loss, _ = policy_loss(logp, ref, torch.zeros(2), mask, BETA, kl_placement="loss")
    loss.backward()
    # d/d logp_bt of BETA/B sum_b sum_t (logp_bt - ref_bt) = BETA / B on real tokens
    torch.testing.assert_close(logp.grad, BETA * mask / 2)


def test_pads_with_inf_do_not_poison_loss_or_gradient():
    logp, ref, adv, mask = _tiny()
    bad_logp = torch.tensor(LOGP)
    bad_logp[1, 2] = -math.inf
    bad_logp.requires_grad_(True)
    bad_ref = ref.clone()
    bad_ref[1, 2] = math.inf
    for placement, est in (("loss", "k3"), ("reward", "k1")):
        kwargs = {"kl_estimator": est, "kl_placement": placement}
        ref_loss, _ = policy_loss(logp, ref, adv, mask, BETA, **kwargs)
        loss, _ = policy_loss(bad_logp, bad_ref, adv, mask, BETA, **kwargs)
        (g_ref,) = torch.autograd.grad(ref_loss, logp)
        (g,) = torch.autograd.grad(loss, bad_logp)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(g, g_ref)


def _random_rollout(n, g, c, seed):
    gen = torch.Generator().manual_seed(seed)
    b = n * g
    logp = (-torch.rand(b, c, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    ref = -torch.rand(b, c, generator=gen, dtype=torch.float64) * 3
    lengths = torch.randint(1, c + 1, (b,), generator=gen)
    mask = (torch.arange(c)[None, :] < lengths[:, None]).double()
    rewards = torch.randn(n, g, generator=gen, dtype=torch.float64)
    self_rewards = torch.randint(0, 8, (n, g), generator=gen).double()
    return logp, ref, mask, lengths.tolist(), rewards, self_rewards


def _loop_sum(x, b, length):
    total = 0.0
    for t in range(length):
        total = total + x[b, t]
    return total


def _paper_term(logp, ref, b, length, adv, beta):
    # pi/sg(pi) A - beta log(pi/pi_ref) for sequence b, sequence log-probs summed by loop.
    seq_logp, seq_ref = _loop_sum(logp, b, length), _loop_sum(ref, b, length)
    return torch.exp(seq_logp - seq_logp.detach()) * adv - beta * (seq_logp - seq_ref)


def _naive_solver_loss(logp, ref, lengths, adv, beta):
    # L_sol = -1/(N G) sum_ij [...]; answer j to query i is row i*G + j.
    n, g = adv.shape
    total = 0.0
    for i in range(n):
        for j in range(g):
            b = i * g + j
            total = total + _paper_term(logp, ref, b, lengths[b], adv[i, j], beta)
    return -total / (n * g)


def _naive_challenger_loss(logp, ref, lengths, adv, beta):
    # L_ch = -1/N sum_i [...]
    n = adv.shape[0]
    total = 0.0
    for i in range(n):
        total = total + _paper_term(logp, ref, i, lengths[i], adv[i], beta)
    return -total / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solver_and_challenger_losses_match_naive_paper_loops(seed):
    # The paper's loss as written, term by term (kl_placement="loss", the literal option).
    n, g, c, beta = 3, 4, 6, 0.05
    logp, ref, mask, lengths, rewards, self_rewards = _random_rollout(n, g, c, seed)
    s_adv, c_adv, _, _ = lsp_advantages(rewards, self_rewards)
    assert s_adv.abs().min() > 0  # every advantage contributes

    naive = _naive_solver_loss(logp, ref, lengths, s_adv, beta)
    loss, _ = policy_loss(logp, ref, s_adv.reshape(-1), mask, beta, kl_placement="loss")
    (g_naive,) = torch.autograd.grad(naive, logp)
    (g_vec,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(g_vec, g_naive)

    # Challenger: the first N rows play the role of the N queries.
    naive_ch = _naive_challenger_loss(logp, ref, lengths, c_adv, beta)
    loss_ch, _ = policy_loss(logp[:n], ref[:n], c_adv, mask[:n], beta, kl_placement="loss")
    (g_naive,) = torch.autograd.grad(naive_ch, logp)
    (g_vec,) = torch.autograd.grad(loss_ch, logp)
    torch.testing.assert_close(loss_ch, naive_ch)
    torch.testing.assert_close(g_vec, g_naive)


@pytest.mark.parametrize(
    ("aggregation", "placement", "estimator"),
    [
        (agg, pl, est)
        for agg, (pl, est) in itertools.product(
            ("seq_sum", "token_mean", "seq_mean"),
            (("loss", "k1"), ("loss", "k3"), ("reward", "k1")),
        )
    ],
)
def test_gradient_accumulation_matches_full_batch(aggregation, placement, estimator):
    logp, ref, mask, _, rewards, _ = _random_rollout(2, 3, 5, seed=7)
    adv = rewards.reshape(-1)
    kwargs = {"kl_estimator": estimator, "kl_placement": placement, "aggregation": aggregation}
    full, _ = policy_loss(logp, ref, adv, mask, 0.05, **kwargs)
    (g_full,) = torch.autograd.grad(full, logp)

    accumulated, g_acc = 0.0, torch.zeros_like(logp)
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):  # uneven micro-batches
        micro, _ = policy_loss(
            logp[rows], ref[rows], adv[rows], mask[rows], 0.05,
            num_sequences=6, num_tokens=mask.sum(), **kwargs,
        )  # fmt: skip
        g_acc += torch.autograd.grad(micro, logp)[0]
        accumulated = accumulated + micro.detach()
    torch.testing.assert_close(accumulated, full.detach())
    torch.testing.assert_close(g_acc, g_full)


def _toy_policy_expectations(placement):
    # Exact expectation over all sequences of a 2-token, 3-symbol autoregressive policy:
    # returns (grad of E_pi[loss], grad of the exact KL(pi || pi_ref)) w.r.t. the logits.
    gen = torch.Generator().manual_seed(3)
    v = 3
    theta1 = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(v, v, generator=gen, dtype=torch.float64, requires_grad=True)
    ref1, ref2 = torch.randn(v, generator=gen).double(), torch.randn(v, v, generator=gen).double()
    expected_loss, kl = 0.0, 0.0
    for x1, x2 in itertools.product(range(v), range(v)):
        logp = torch.stack([theta1.log_softmax(-1)[x1], theta2[x1].log_softmax(-1)[x2]])[None]
        ref = torch.stack([ref1.log_softmax(-1)[x1], ref2[x1].log_softmax(-1)[x2]])[None]
        seq_logp = logp.sum()
        loss, _ = policy_loss(
            logp, ref, torch.zeros(1), torch.ones(1, 2), 1.0, kl_placement=placement
        )
        expected_loss = expected_loss + seq_logp.exp().detach() * loss  # sampling weight
        kl = kl + seq_logp.exp() * (seq_logp - ref.sum())
    g_loss = torch.autograd.grad(expected_loss, (theta1, theta2), retain_graph=True)
    g_kl = torch.autograd.grad(kl, (theta1, theta2))
    return g_loss, g_kl


def test_kl_as_reward_is_exact_gradient_of_sequence_kl():
    g_loss, g_kl = _toy_policy_expectations("reward")
    assert g_kl[1].abs().max() > 1e-2  # the check is not vacuous
    for a, b in zip(g_loss, g_kl, strict=True):
        torch.testing.assert_close(a, b)


def test_k1_in_loss_has_zero_expected_gradient():
    # Why kl_placement="reward" exists: E_pi[grad log pi] = 0, so the paper's k1 term
    # differentiated in the loss does not pull pi towards pi_ref in expectation.
    g_loss, _ = _toy_policy_expectations("loss")
    for a in g_loss:
        torch.testing.assert_close(a, torch.zeros_like(a))


def test_total_loss():
    # The one alpha_ch weighting (module backward and loss/total metric): L_sol + alpha_ch L_ch.
    assert role_weight("challenger", 0.25) == 0.25
    assert role_weight("solver", 0.25) == 1.0
    # 1.5 + 0.25 * 2.0 = 2.0 exactly (binary fractions); default-like alpha_ch = 1: 3.5
    assert total_loss({"challenger": 2.0, "solver": 1.5}, 0.25) == 2.0
    assert total_loss({"challenger": 2.0, "solver": 1.5}, 1.0) == 3.5
    assert total_loss({"solver": 1.5}, 0.25) == 1.5  # no Challenger rows (GRPO)
    assert total_loss({}, 0.25) == 0.0 and isinstance(total_loss({}, 0.25), float)
