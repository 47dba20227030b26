"""Head-to-head scoring with alpaca-eval itself: `alpaca_eval.evaluate` (its annotator, cache and
`get_winrate`), then alpaca-eval's `get_winrate` again on each subset.

Offline pitfalls handled (../shared/docs/environment.md): the baseline is always passed explicitly as
`reference_outputs` (never the hub default), `precomputed_leaderboard=None`, `fn_metric="get_winrate"`.

Ties: alpaca-eval counts a tie (preference 1.5) as half a win (`win_rate`); the paper's 26.5% for
the base model against itself implies ties count as non-wins (`win_rate_ties_as_loss`). Both are
reported, each with its standard error. The length-controlled win rate comes from alpaca-eval when
its hub data (`df_gamed.csv`) can be had; otherwise it is reported unavailable, with the reason.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

TIE = 1.5


def _finite(x) -> float | int | None:
    """JSON-safe numbers: NaN (e.g. the standard error of one sample) becomes null."""
    if x is None:
        return None
    x = x.item() if hasattr(x, "item") else x
    return None if isinstance(x, float) and not math.isfinite(x) else x


def winrate_block(annotations: pd.DataFrame) -> dict:
    """alpaca-eval's `get_winrate` plus the ties-as-non-wins view and average lengths (characters).
    Preference: 1 baseline (output_1) better, 2 candidate (output_2) better, 1.5 tie."""
    from alpaca_eval.metrics import get_winrate

    m = get_winrate(annotations)
    pref = pd.to_numeric(annotations["preference"], errors="coerce")
    pref = pref[(pref >= 1) & (pref <= 2)]
    wins = (pref > TIE).astype(float)  # ties (and exact 1.5 in weighted mode) are non-wins
    return {k: _finite(v) for k, v in {
        "win_rate": m["win_rate"], "standard_error": m["standard_error"],
        "win_rate_ties_as_loss": wins.mean() * 100, "standard_error_ties_as_loss": wins.sem() * 100,
        "discrete_win_rate": m["discrete_win_rate"], "n_wins": m["n_wins"],
        "n_losses": m["n_wins_base"], "n_ties": m["n_draws"], "n_total": m["n_total"],
        "avg_length": annotations["output_2"].str.len().mean(),
        "baseline_avg_length": annotations["output_1"].str.len().mean(),
    }.items()}


def subset_column(annotations: pd.DataFrame) -> str:
    # alpaca-eval keeps one `dataset` column when both sides agree, else dataset_1 / dataset_2.
    return "dataset" if "dataset" in annotations else "dataset_2"


def length_controlled(annotations: pd.DataFrame, eval_index: dict[str, int] | None,
                      enabled: bool) -> dict:
    """alpaca-eval's LC win rate; its GLM needs each instruction's position in the full AlpacaEval
    set (`eval_index`) and `df_gamed.csv` from the hub. Never approximated here."""
    if not enabled:
        return {"available": False, "reason": "not requested (eval.length_controlled)"}
    if eval_index is None or any(q not in eval_index for q in annotations["instruction"]):
        return {"available": False, "reason": "needs the 805 AlpacaEval instructions"}
    try:
        from alpaca_eval.metrics import get_length_controlled_winrate

        df = annotations.copy()
        df.index = [eval_index[q] for q in df["instruction"]]
        m = get_length_controlled_winrate(df, save_weights_dir=None)
    except Exception as err:  # offline: the hub download of df_gamed.csv fails
        return {"available": False, "reason": unavailable_reason(err),
                "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"available": True, "length_controlled_winrate": _finite(m["length_controlled_winrate"]),
            "lc_standard_error": _finite(m["lc_standard_error"])}


def unavailable_reason(err: Exception) -> str:
    """A short human reason for a figure that could not be computed (the report, DVC metrics);
    the exception itself goes beside it as `error`."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    if isinstance(err, offline) or "offline" in str(err).lower():
        return "needs the hub (offline)"
    return f"failed ({type(err).__name__}, see details.json)"


def cached_count(path: str | Path | None) -> int:
    """Annotations in a judge's cache file (new judgements = count after - count before)."""
    if path is None or not Path(path).exists():
        return 0
    return len(json.loads(Path(path).read_text() or "[]"))


def score_head2head(
    candidate: Sequence[dict], baseline: Sequence[dict], judge, out_dir: str | Path,
    eval_index: dict[str, int] | None = None, lc: bool = True,
) -> tuple[dict, pd.DataFrame]:
    """Win rate of `candidate` (alpaca-eval's output_2) against `baseline` (output_1), judged by
    `judge` through alpaca-eval; writes `annotations.json` and `leaderboard.csv` into `out_dir`."""
    import alpaca_eval

    kwargs = judge.annotator_kwargs()
    before, pairs_before, secs_before = cached_count(kwargs.get("caching_path")), *_stats(judge)
    start = time.perf_counter()
    _, annotations = alpaca_eval.evaluate(
        model_outputs=pd.DataFrame(list(candidate)), reference_outputs=pd.DataFrame(list(baseline)),
        output_path=str(out_dir), precomputed_leaderboard=None, fn_metric="get_winrate",
        sort_by="win_rate", is_return_instead_of_print=True,
        annotation_kwargs={"chunksize": judge.chunksize}, **kwargs,
    )
    wall = time.perf_counter() - start
    df = pd.DataFrame(annotations)
    col = subset_column(df)
    metrics = {
        "overall": winrate_block(df),
        "subsets": {name: winrate_block(g) for name, g in sorted(df.groupby(col))},
        "length_controlled": length_controlled(df, eval_index, lc),
        "judging": _judging(judge, cached_count(kwargs.get("caching_path")) - before,
                            pairs_before, secs_before, wall),
    }
    return metrics, df


def _stats(judge) -> tuple[int | None, float | None]:
    return getattr(judge, "n_pairs", None), getattr(judge, "seconds", None)


def _judging(judge, new_cached: int, pairs_before, secs_before, wall: float) -> dict:
    """New judgements and time per judged pair: the judge's own count and clock where it keeps
    them (the local judge), else the growth of its cache and the wall time."""
    pairs, secs = _stats(judge)
    if pairs is not None:
        new, seconds = pairs - pairs_before, secs - secs_before
    else:
        new, seconds = new_cached, wall
    return {"new_judgements": new, "judge_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
            "seconds_per_pair": round(seconds / new, 3) if new else None}
