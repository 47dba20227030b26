"""The study report's figures: training curves, per-subset win rates (the paper's Figure 2 shape),
checkpoint-selection scores. Matplotlib's object API (`Figure`, no pyplot): no global state and no
display needed, so it runs headless in DVC and CI (PNG through the Agg canvas)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from lsp.evaluation.outputs import SUBSETS  # AlpacaEval's five subsets, in the paper's order

# (history key, panel title, y label): one panel each, as issue 4 asks.
CURVES = (
    ("solver/reward_mean", "Solver reward R(q, a)", "reward (batch mean)"),
    ("challenger/reward_mean", "Challenger reward", "reward (batch mean)"),
    ("self_reward/mean", "Quality self-reward R_Q (LSP only)", "score 0-7 (batch mean)"),
    ("kl/solver", "KL to reference: Solver", "sequence log-ratio (k1)"),
    ("kl/challenger", "KL to reference: Challenger", "sequence log-ratio (k1)"),
    ("rollout/query_len_mean", "Challenger query length", "tokens (batch mean)"),
)
SMOOTH_FROM = 20  # with fewer logged steps every point is shown as is


def arm_colors(arms: Sequence[str]) -> dict[str, str]:
    """One colour per arm, the same in every figure."""
    return {arm: f"C{i % 10}" for i, arm in enumerate(arms)}


# ---- training curves -------------------------------------------------------------------------
def _series(history: list[dict], key: str) -> pd.Series:
    pts = {int(r["step"]): r[key] for r in history if r.get(key) is not None}
    return pd.Series(pts, dtype=float).sort_index()


def smoothing_window(histories: dict[str, list[dict]]) -> int:
    """One rolling-mean window for every arm (1: no smoothing): the arms compare like for like."""
    longest = max(len(h) for h in histories.values())
    return 1 if longest < SMOOTH_FROM else max(longest // 15, 3)


def _plot_curve(ax, s: pd.Series, color: str, window: int) -> None:
    if window == 1:
        ax.plot(s.index, s.values, marker="o", ms=3, color=color)
        return
    # RL curves are noisy step to step: raw faint, a centred rolling mean on top.
    ax.plot(s.index, s.values, color=color, alpha=0.25, lw=0.8)
    smooth = s.rolling(window, center=True, min_periods=1).mean()
    ax.plot(s.index, smooth.values, color=color, lw=1.8)


def _empty_panel(ax, title: str, message: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _arm_legend(fig, arms: list[str], colors: dict[str, str]) -> None:
    """One legend for the figure: an arm has the same colour in every panel."""
    handles = [Line2D([], [], color=colors[a], lw=2) for a in arms]
    fig.legend(handles, arms, loc="outside lower center", ncols=min(len(arms), 6), fontsize=9)


def plot_training_curves(histories: dict[str, list[dict]], path: Path,
                         colors: dict[str, str]) -> Path | None:
    """2x3 panels, one per CURVES entry, one line per arm; None when no arm has a history."""
    histories = {a: h for a, h in histories.items() if h}
    if not histories:
        return None
    window = smoothing_window(histories)
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    for ax, (key, title, ylabel) in zip(fig.subplots(2, 3).flat, CURVES, strict=True):
        series = {arm: _series(hist, key) for arm, hist in histories.items()}
        series = {arm: s for arm, s in series.items() if len(s)}
        if not series:
            _empty_panel(ax, title, f"not logged by any arm\n({key})")
            continue
        for arm, s in series.items():
            _plot_curve(ax, s, colors[arm], window)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    how = "every logged step" if window == 1 else \
        f"faint: every step; bold: centred rolling mean over {window} steps"
    fig.suptitle(f"Training curves per arm (history.csv; {how})", fontsize=12)
    _arm_legend(fig, list(histories), colors)
    fig.savefig(path, dpi=110)
    return path


# ---- win rates -------------------------------------------------------------------------------
def _rate(block: dict | None, ties: str) -> tuple[float, float]:
    """(win rate %, standard error %) of a win-rate block; NaN where missing."""
    if not block:
        return np.nan, np.nan
    key, se = ("win_rate", "standard_error") if ties == "half" else \
        ("win_rate_ties_as_loss", "standard_error_ties_as_loss")
    rate, err = block.get(key), block.get(se)
    return (np.nan if rate is None else rate), (0.0 if err is None else err)


def win_rate_groups(results: dict[str, dict]) -> list[str]:
    """Subsets present in any arm (AlpacaEval's five first, in order), then overall."""
    seen = {s for r in results.values() for s in (r.get("subsets") or {})}
    extra = sorted(seen - set(SUBSETS))
    return [s for s in SUBSETS if s in seen] + extra + ["overall"]


def _group_label(group: str, results: dict[str, dict]) -> str:
    blocks = [r.get("overall") if group == "overall" else (r.get("subsets") or {}).get(group)
              for r in results.values()]
    n = max((b.get("n_total") or 0 for b in blocks if b), default=0)
    return f"{group}\n(n={n})"


def _bars(ax, results: dict[str, dict], groups: list[str], ties: str,
          colors: dict[str, str]) -> float:
    """Draws one panel; returns the highest bar top (rate + SE) for the y range."""
    x = np.arange(len(groups))
    width = 0.8 / len(results)
    top = 0.0
    for i, (arm, res) in enumerate(results.items()):
        blocks = [res.get("overall") if g == "overall" else (res.get("subsets") or {}).get(g)
                  for g in groups]
        rates, errs = zip(*(_rate(b, ties) for b in blocks), strict=True)
        ax.bar(x + (i - (len(results) - 1) / 2) * width, rates, width, yerr=errs, capsize=3,
               color=colors[arm], label=arm, error_kw={"lw": 1, "ecolor": "0.2"})
        top = max(top, np.nanmax(np.add(rates, errs), initial=0.0))
    ax.axhline(50, ls="--", color="0.3", lw=1)
    ax.axvline(len(groups) - 1.5, color="0.7", lw=0.8)  # separates the subsets from overall
    ax.set_xticks(x, [_group_label(g, results) for g in groups], fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return top


def plot_win_rates(results: dict[str, dict], path: Path, colors: dict[str, str],
                   baseline: str = "base", judge_note: str = "", warn: bool = False,
                   labels: dict[str, str] | None = None) -> Path | None:
    """Per-subset and overall win rate of each arm against `baseline`, ± one standard error;
    two panels because the two tie conventions differ (alpaca-eval: half a win; the paper's
    26.5% for the base against itself: a non-win). `results`: arm -> a `vs_<baseline>` block.
    `warn`: the judge is known to be weak; the title says so in red. `labels`: legend text per
    arm (e.g. with the evaluated checkpoint)."""
    if not results:
        return None
    groups = win_rate_groups(results)
    width = max(9.0, 2.0 + 0.45 * len(groups) * max(len(results), 2))
    fig = Figure(figsize=(width, 8.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    tops = [_bars(ax, results, groups, ties, colors) for ax, ties in zip(axes, ("half", "loss"),
                                                                         strict=True)]
    for ax, label in zip(axes, ("ties count half a win (alpaca-eval)",
                                "ties count as non-wins (the paper's reading)"), strict=True):
        ax.set_ylabel(f"win rate vs {baseline} (%)")
        ax.set_title(label, fontsize=10)
    axes[0].set_ylim(0, min(100, max(60, 10 * np.ceil(max(tops) / 10 + 0.5))))
    axes[1].tick_params(labelbottom=True)
    handles = [Line2D([], [], color=colors[a], lw=8) for a in results]
    handles.append(Line2D([], [], color="0.3", ls="--"))
    fig.legend(handles, [*((labels or {}).get(a, a) for a in results), "50%"],
               loc="outside lower center", ncols=min(len(results) + 1, 6), fontsize=9)
    title = f"AlpacaEval win rate against the {baseline} model's outputs, per subset (± 1 SE)"
    fig.suptitle(f"{title}\n{judge_note}" if judge_note else title, fontsize=11,
                 color="firebrick" if warn else "black")
    fig.savefig(path, dpi=110)
    return path


# ---- checkpoint selection --------------------------------------------------------------------
def plot_selection(selections: dict[str, dict], path: Path, colors: dict[str, str]) -> Path | None:
    """Validation score of each checkpoint per arm (± SE over prompts), the chosen one starred."""
    selections = {a: s for a, s in selections.items() if s and s.get("candidates")}
    if not selections:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for arm, sel in selections.items():
        cands = sorted(sel["candidates"], key=lambda c: c["step"])
        steps = [c["step"] for c in cands]
        scores = [c["score"] for c in cands]
        errs = [(c.get("score_std") or 0.0) / max(c.get("n") or 1, 1) ** 0.5 for c in cands]
        ax.errorbar(steps, scores, yerr=errs, marker="o", ms=4, capsize=3, color=colors[arm],
                    label=arm)
        chosen = sel.get("chosen") or {}
        if "step" in chosen:
            ax.plot([chosen["step"]], [chosen["score"]], marker="*", ms=16, color=colors[arm],
                    mec="black", ls="none")
    ax.plot([], [], marker="*", ms=12, color="white", mec="black", ls="none", label="chosen")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("checkpoint step (0: the base model)")
    ax.set_ylabel("mean training reward on validation prompts")
    ax.set_title("Checkpoint selection (selection.json; ± 1 SE over prompts)", fontsize=11)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()  # lines come before error bars: chosen last
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "chosen")
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    fig.savefig(path, dpi=110)
    return path
