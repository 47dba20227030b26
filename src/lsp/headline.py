"""The handful of figures a researcher compares, per study stage: the DVC metrics files
(`metrics/<stage>/<name>.json`) and the metrics of each arm's MLflow parent run.

Every stage keeps everything else in its own `details.json` (not a DVC metric). Names are
shared by the rows of one kind (and `step` / `reward` by training and selection, where they
mean the same: the step of the model the row describes, its mean reward), so that
`dvc metrics show` has a dozen columns, not one per figure per file. Values are rounded here:
percentages to 0.1 point, rewards and KL to 3 decimals, p-values to 3 significant digits.

- train:   step (last), reward (Solver reward, mean of the last 10% of steps), kl (Solver KL, same)
- select:  step (chosen), reward (its mean reward on the validation prompts)
- alpaca_eval: win_rate, win_se (vs the base, %), lc_win_rate (% or a short reason)
- ifeval:  prompt_strict, prompt_loose (%), and for an arm delta (prompt-level strict minus the
           base, points, paired) and p (exact McNemar); its bootstrap 95% CI is in details.json
           and the report (two more columns would take `dvc metrics show` past 160 characters)
- pooled (the report stage; lsp.study.pooled), per arm (metrics/pooled/<arm>.json): seen (the
           primary endpoint: seen-type IFEval prompts, prompt-level loose, the mean over seeds of
           the paired difference against base-<seed>, points), lo / hi (its two-level bootstrap
           95% CI), sd (the seed-to-seed SD; null with one seed), win_rate (the AlpacaEval win
           rate against base-<seed>, pooled, %); for the base (metrics/pooled/base.json) card
           (IFEval in the model card's form, %) with the same lo, hi, sd. The arm's MLflow
           parent also gets all_strict, all_loose, held_out_loose (pooled differences),
           win_ci_low / win_ci_high and n_seeds
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

WINDOW_FRAC = 0.1  # the training summary averages the last 10% of steps (at least one)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def train_figures(history: Sequence[Mapping]) -> dict:
    """history.csv rows (lsp.selfplay.callbacks.read_history: one per step) -> step, reward, kl."""
    if not history:
        return {"step": 0}
    tail = list(history)[-max(1, round(len(history) * WINDOW_FRAC)):]

    def end(key: str) -> float | None:
        return _mean([r[key] for r in tail if r.get(key) is not None])

    return {"step": int(history[-1]["step"]), "reward": _r(end("solver/reward_mean"), 3),
            "kl": _r(end("kl/solver"), 3)}


def select_figures(selection: Mapping) -> dict:
    chosen = selection["chosen"]
    return {"step": int(chosen["step"]), "reward": _r(chosen["score"], 3)}


def alpaca_figures(details: Mapping) -> dict:
    """lsp.evaluate's details (vs_base block) -> win_rate, win_se, lc_win_rate."""
    block = details.get("vs_base") or {}
    overall, lc = block.get("overall") or {}, block.get("length_controlled") or {}
    if not overall:
        return {}
    return {"win_rate": _r(overall["win_rate"], 1), "win_se": _r(overall["standard_error"], 1),
            "lc_win_rate": _r(lc["length_controlled_winrate"], 1) if lc.get("available")
            else lc.get("reason", "not computed")}


def ifeval_figures(details: Mapping) -> dict:
    """lsp.evaluation.ifeval details -> the two prompt-level figures and, for an arm, the
    paired prompt-level strict difference against the base."""
    # the details hold fractions; the figures are percentages and points
    out = {"prompt_strict": _r(100 * details["prompt_level_strict"], 1),
           "prompt_loose": _r(100 * details["prompt_level_loose"], 1)}
    paired = (details.get("vs_base") or {}).get("strict")
    if paired:
        out |= {"delta": _r(100 * paired["difference"], 1), "p": float(f"{paired['mcnemar_p']:.3g}")}
    return out


def _spread(p: Mapping) -> dict:
    """A pooled figure's (lsp.study.pooled.pooled) 95% CI (`lo`, `hi`) and seed SD (`sd`); short
    names: `dvc metrics show` has a column per name (the seed count is on the MLflow parent)."""
    lo, hi = p.get("ci95") or (None, None)
    return {"lo": _r(lo, 1), "hi": _r(hi, 1), "sd": _r(p.get("seed_sd"), 1)}


def pooled_figures(arm: Mapping) -> dict:
    """One arm's pooled statistics (the report's pooled.json, `arms.<arm>`) -> `seen`, the
    primary endpoint (IFEval prompt-level loose on the seen-type prompts, the mean paired
    difference against the base in points), its CI and seed SD, and the pooled AlpacaEval win
    rate."""
    primary = arm["ifeval"]["seen"]["prompt_loose"]
    return {"seen": _r(primary.get("estimate"), 1), **_spread(primary),
            "win_rate": _r(arm["alpaca"]["overall"].get("estimate"), 1)}


def pooled_extra(arm: Mapping) -> dict:
    """The arm's secondary pooled figures, for its MLflow parent only (`dvc metrics show` keeps
    to a few columns): IFEval differences on all and held-out prompts, the win rate's CI, the
    seed count."""
    ife = arm["ifeval"]
    lo, hi = arm["alpaca"]["overall"].get("ci95") or (None, None)
    return {"all_strict": _r(ife["all"]["prompt_strict"].get("estimate"), 1),
            "all_loose": _r(ife["all"]["prompt_loose"].get("estimate"), 1),
            "held_out_loose": _r(ife["held_out"]["prompt_loose"].get("estimate"), 1),
            "win_ci_low": _r(lo, 1), "win_ci_high": _r(hi, 1),
            "n_seeds": ife["seen"]["prompt_loose"].get("n_seeds", 0)}


def card_figures(card: Mapping) -> dict:
    """The base in the model card's IFEval form (the report's pooled.json, `base.card`)."""
    return {"card": _r(card.get("estimate"), 1), **_spread(card)}
