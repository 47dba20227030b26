import math

import pytest
import torch

from lsp.selfplay.advantages import (
    challenger_advantages,
    invalid_margin,
    lsp_advantages,
    selfplay_advantages,
    solver_advantages,
)


def test_solver_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    # group means 2 and 4 -> [[1-2, 2-2, 3-2], [0, 0, 0]]
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(solver_advantages(rewards), expected)


def test_solver_advantages_std_scaling_uses_population_std():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    # row 0: population std = sqrt(((-1)^2 + 0 + 1^2) / 3) = sqrt(2/3) -> adv / sqrt(2/3)
    # row 1: std 0 -> 0 / (0 + eps) = 0, not NaN
    s = math.sqrt(2.0 / 3.0)
    expected = torch.tensor([[-1.0 / s, 0.0, 1.0 / s], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(solver_advantages(rewards, scale_std=True), expected)


def test_solver_advantages_single_answer_group_is_zero_not_nan():
    adv = solver_advantages(torch.tensor([[3.0], [5.0]]), scale_std=True)
    torch.testing.assert_close(adv, torch.zeros(2, 1))


def test_equal_rewards_give_zero_solver_advantage():
    rewards = torch.randn(5, 1).expand(5, 4)
    torch.testing.assert_close(solver_advantages(rewards), torch.zeros(5, 4))
    torch.testing.assert_close(solver_advantages(rewards, scale_std=True), torch.zeros(5, 4))


def test_challenger_advantages_hand_computed():
    # rewards -V = [-2, -4]; batch mean -3 -> [1, -1]
    torch.testing.assert_close(
        challenger_advantages(torch.tensor([-2.0, -4.0])), torch.tensor([1.0, -1.0])
    )
    # population std of [1, -1] is 1 -> unchanged (up to eps)
    torch.testing.assert_close(
        challenger_advantages(torch.tensor([-2.0, -4.0]), scale_std=True),
        torch.tensor([1.0, -1.0]),
        atol=1e-5,
        rtol=0,
    )


def test_challenger_advantages_query_mask_excludes_from_mean():
    rewards = torch.tensor([-2.0, float("nan"), -4.0, 10.0])
    mask = torch.tensor([True, False, True, False])
    # mean over valid {-2, -4} = -3 -> [1, 0, -1, 0]; the NaN must not leak
    expected = torch.tensor([1.0, 0.0, -1.0, 0.0])
    torch.testing.assert_close(challenger_advantages(rewards, query_mask=mask), expected)
    # std over valid advantages [1, -1] is 1 (the masked 10 must not inflate it)
    torch.testing.assert_close(
        challenger_advantages(rewards, scale_std=True, query_mask=mask), expected, atol=1e-5, rtol=0
    )


def test_challenger_advantages_all_masked_is_zero():
    adv = challenger_advantages(torch.tensor([1.0, 2.0]), query_mask=torch.zeros(2, dtype=bool))
    torch.testing.assert_close(adv, torch.zeros(2))


def test_lsp_zero_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    s_adv, c_adv, s_rew, c_rew = lsp_advantages(rewards)
    torch.testing.assert_close(s_adv, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(s_rew, rewards)
    # V = [2, 4] -> challenger rewards -V = [-2, -4]; mean -3 -> adv [1, -1]
    torch.testing.assert_close(c_rew, torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(c_adv, torch.tensor([1.0, -1.0]))


def test_lsp_with_self_reward_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    self_rewards = torch.tensor([[7.0, 1.0, 1.0], [0.0, 3.0, 6.0]])
    s_adv, c_adv, s_rew, c_rew = lsp_advantages(rewards, self_rewards)
    # solver reward R + R_Q = [[8, 3, 4], [4, 7, 10]]; group means 5 and 7
    torch.testing.assert_close(s_rew, torch.tensor([[8.0, 3.0, 4.0], [4.0, 7.0, 10.0]]))
    torch.testing.assert_close(s_adv, torch.tensor([[3.0, -2.0, -1.0], [-3.0, 0.0, 3.0]]))
    # V = [2, 4], V_Q = [3, 3] -> challenger reward -V + V_Q = [1, -1]; mean 0 -> adv [1, -1]
    torch.testing.assert_close(c_rew, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(c_adv, torch.tensor([1.0, -1.0]))


def test_lsp_self_reward_weight():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    self_rewards = torch.tensor([[7.0, 1.0, 1.0], [0.0, 3.0, 6.0]])
    _, c_adv, s_rew, c_rew = lsp_advantages(rewards, self_rewards, self_reward_weight=0.5)
    # solver reward R + 0.5 R_Q = [[4.5, 2.5, 3.5], [4, 5.5, 7]]
    torch.testing.assert_close(s_rew, torch.tensor([[4.5, 2.5, 3.5], [4.0, 5.5, 7.0]]))
    # challenger reward -V + 0.5 V_Q = [-2 + 1.5, -4 + 1.5] = [-0.5, -2.5]; mean -1.5 -> [1, -1]
    torch.testing.assert_close(c_rew, torch.tensor([-0.5, -2.5]))
    torch.testing.assert_close(c_adv, torch.tensor([1.0, -1.0]))


def test_lsp_zero_equals_zero_self_rewards():
    rewards = torch.randn(4, 3)
    for scale_std in (False, True):
        zero = lsp_advantages(rewards, scale_std=scale_std)
        with_zeros = lsp_advantages(rewards, torch.zeros(4, 3), scale_std=scale_std)
        for a, b in zip(zero, with_zeros, strict=True):
            torch.testing.assert_close(a, b)


# A mixed batch: N = 4 queries, the 2nd and 4th invalid (never answered); G = 2 answers each
# for the two valid ones, in order: rewards [[1, 3], [6, 8]].
MIXED_VALID = torch.tensor([True, False, True, False])
MIXED_REWARDS = torch.tensor([[1.0, 3.0], [6.0, 8.0]])


def test_selfplay_advantages_penalize_mixed_batch():
    out = selfplay_advantages(MIXED_REWARDS, MIXED_VALID, invalid_query="penalize",
                              margin_scale="absolute")
    # Solver: group means 2 and 7 -> [[-1, 1], [-1, 1]]
    torch.testing.assert_close(out.solver, torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))
    # Challenger reward -V: valid [-2, -7]; invalid ones: min(-2, -7) - 1 = -8
    # -> [-2, -8, -7, -8]; batch mean over all four = -25 / 4 = -6.25
    # advantages: [-2 + 6.25, -8 + 6.25, -7 + 6.25, -8 + 6.25] = [4.25, -1.75, -0.75, -1.75]
    torch.testing.assert_close(out.challenger_reward, torch.tensor([-2.0, -8.0, -7.0, -8.0]))
    torch.testing.assert_close(out.challenger, torch.tensor([4.25, -1.75, -0.75, -1.75]))


def test_selfplay_advantages_skip_mixed_batch():
    out = selfplay_advantages(MIXED_REWARDS, MIXED_VALID, invalid_query="skip",
                              margin_scale="absolute")
    torch.testing.assert_close(out.solver, torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))
    # valid Challenger rewards [-2, -7], mean -4.5 -> [2.5, -2.5]; invalid ones: advantage 0
    # (their recorded reward is the same min - 1 = -8, outside the baseline)
    torch.testing.assert_close(out.challenger_reward, torch.tensor([-2.0, -8.0, -7.0, -8.0]))
    torch.testing.assert_close(out.challenger, torch.tensor([2.5, 0.0, -2.5, 0.0]))


def test_selfplay_advantages_with_self_reward_mixed_batch():
    self_rewards = torch.tensor([[4.0, 6.0], [0.0, 2.0]])
    out = selfplay_advantages(MIXED_REWARDS, MIXED_VALID, self_rewards, 0.5, invalid_query="penalize",
                              margin_scale="absolute")
    # Solver reward R + 0.5 R_Q = [[3, 6], [6, 9]]; group means 4.5, 7.5 -> [[-1.5, 1.5], [-1.5, 1.5]]
    torch.testing.assert_close(out.solver, torch.tensor([[-1.5, 1.5], [-1.5, 1.5]]))
    # Challenger -V + 0.5 V_Q: [-2 + 2.5, -7 + 0.5] = [0.5, -6.5]; invalid: -6.5 - 1 = -7.5
    # -> [0.5, -7.5, -6.5, -7.5], mean -21 / 4 = -5.25 -> [5.75, -2.25, -1.25, -2.25]
    torch.testing.assert_close(out.challenger, torch.tensor([5.75, -2.25, -1.25, -2.25]))


def test_invalid_margin_in_units_of_the_reward_spread():
    """The default margin (issue 35): invalid_margin x the population std of the valid Solver
    rewards. Rewards [[1, 1], [3, 3]]: mean 2, deviations +-1, std 1; Challenger -V = [-1, -3];
    margin 2 -> an invalid query's reward is -3 - 2 x 1 = -5."""
    rewards, valid = torch.tensor([[1.0, 1.0], [3.0, 3.0]]), MIXED_VALID
    assert invalid_margin(rewards, 2.0, "spread") == pytest.approx(1.0 * 2.0)
    assert invalid_margin(rewards * 10, 2.0, "spread") == pytest.approx(20.0)  # scales with R
    assert invalid_margin(rewards * 10, 2.0, "absolute") == 2.0  # the old rule does not
    out = selfplay_advantages(rewards, valid, margin=2.0)  # spread is the default
    torch.testing.assert_close(out.challenger_reward, torch.tensor([-1.0, -5.0, -3.0, -5.0]))
    # mean -14 / 4 = -3.5 -> [2.5, -1.5, 0.5, -1.5]
    torch.testing.assert_close(out.challenger, torch.tensor([2.5, -1.5, 0.5, -1.5]))
    # every answer scored the same: no spread; the margin falls back to reward units, so an
    # invalid query still sits below the valid ones
    assert invalid_margin(torch.ones(2, 2), 0.5) == 0.5
    with pytest.raises(ValueError, match="relative"):
        invalid_margin(rewards, 1.0, "relative")


def test_selfplay_advantages_all_valid_equals_lsp_advantages():
    rewards = torch.randn(3, 4)
    for rule in ("penalize", "skip"):
        out = selfplay_advantages(rewards, torch.ones(3, dtype=torch.bool), invalid_query=rule)
        for a, b in zip(out, lsp_advantages(rewards), strict=True):
            torch.testing.assert_close(a, b)


def test_selfplay_advantages_no_valid_query():
    for rule in ("penalize", "skip"):
        out = selfplay_advantages(None, torch.zeros(3, dtype=torch.bool), invalid_query=rule)
        assert out.solver is None and out.solver_reward is None
        torch.testing.assert_close(out.challenger, torch.zeros(3))
    with pytest.raises(ValueError, match="drop"):
        selfplay_advantages(None, torch.zeros(3, dtype=torch.bool), invalid_query="drop")


def _naive_lsp(rewards, self_rewards):
    # The paper's Algorithm 1 with explicit loops.
    n, g = len(rewards), len(rewards[0])
    v = [sum(rewards[i]) / g for i in range(n)]
    vq = [sum(self_rewards[i]) / g for i in range(n)]
    sol_r = [[rewards[i][j] + self_rewards[i][j] for j in range(g)] for i in range(n)]
    sol_adv = [[sol_r[i][j] - sum(sol_r[i]) / g for j in range(g)] for i in range(n)]
    ch_r = [-v[i] + vq[i] for i in range(n)]
    ch_adv = [ch_r[i] - sum(ch_r) / n for i in range(n)]
    return sol_adv, ch_adv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsp_advantages_match_naive_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    self_rewards = torch.randint(0, 8, (5, 4), generator=gen).double()
    s_adv, c_adv, _, _ = lsp_advantages(rewards, self_rewards)
    sol_adv, ch_adv = _naive_lsp(rewards.tolist(), self_rewards.tolist())
    torch.testing.assert_close(s_adv, torch.tensor(sol_adv, dtype=torch.float64))
    torch.testing.assert_close(c_adv, torch.tensor(ch_adv, dtype=torch.float64))
