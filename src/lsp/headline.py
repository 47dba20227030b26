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
