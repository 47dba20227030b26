"""The curated figures (lsp.headline): hand-computed values from hand-built stage outputs, and the
short reason an unavailable LC win rate carries."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from lsp import headline, tracking
from lsp.evaluation.scoring import unavailable_reason


def _history(n: int) -> list[dict]:
    # step s: reward s / 10, KL 2 s; step 3 lacks its KL (a None cell of history.csv)
    return [{"step": float(s), "solver/reward_mean": s / 10, "kl/solver": None if s == 3 else 2.0 * s}
            for s in range(1, n + 1)]


def test_train_figures_average_the_last_tenth_of_the_steps():
    # 30 steps: the last 3 (28, 29, 30) -> reward 2.9, KL 58
    assert headline.train_figures(_history(30)) == {"step": 30, "reward": 2.9, "kl": 58.0}
    # 4 steps: round(0.4) = 0 -> at least the last step
    assert headline.train_figures(_history(4)) == {"step": 4, "reward": 0.4, "kl": 8.0}
    # a window whose KL cells are empty: the mean of the others (here step 3's is missing)
    assert headline.train_figures(_history(3)[-1:]) == {"step": 3, "reward": 0.3, "kl": None}
    assert headline.train_figures([]) == {"step": 0}


def test_select_and_alpaca_figures():
    selection = {"chosen": {"step": 60, "score": 0.123456, "path": "x"}, "candidates": []}
    assert headline.select_figures(selection) == {"step": 60, "reward": 0.123}
    details = {"vs_base": {"overall": {"win_rate": 51.25, "standard_error": 7.891, "n_total": 40},
                           "length_controlled": {"available": False, "reason": "needs the hub (offline)"}}}
    assert headline.alpaca_figures(details) == {"win_rate": 51.2, "win_se": 7.9,
                                                "lc_win_rate": "needs the hub (offline)"}
    details["vs_base"]["length_controlled"] = {"available": True, "length_controlled_winrate": 48.04}
    assert headline.alpaca_figures(details)["lc_win_rate"] == 48.0
    assert headline.alpaca_figures({}) == {}


def test_ifeval_figures_are_percentages_and_points():
    base = {"prompt_level_strict": 0.17191, "prompt_level_loose": 0.18484}
    assert headline.ifeval_figures(base) == {"prompt_strict": 17.2, "prompt_loose": 18.5}
    arm = {**base, "vs_base": {"strict": {"difference": -0.01294, "ci95": [-0.0407, 0.01479],
                                          "mcnemar_p": 0.412345}}}
    assert headline.ifeval_figures(arm) == {"prompt_strict": 17.2, "prompt_loose": 18.5,
                                            "delta": -1.3, "p": 0.412}


def test_numeric_keeps_numbers_only():
    figures = {"win_rate": 51.2, "lc_win_rate": "needs the hub (offline)", "step": 3, "ok": True}
    assert tracking.numeric(figures, "alpaca_eval") == {"alpaca_eval/win_rate": 51.2,
                                                        "alpaca_eval/step": 3.0}


@pytest.mark.parametrize(("err", "reason"), [
    (LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
     "needs the hub (offline)"),
    (ConnectionError("Max retries exceeded"), "needs the hub (offline)"),
    (ValueError("singular matrix"), "failed (ValueError, see details.json)"),
])
def test_unavailable_reason_is_short(err, reason):
    assert unavailable_reason(err) == reason
