"""How far a judge can be trusted, measured on pairs whose preferred side is known.

Two checks, both judged through the same alpaca-eval annotator (and cache) as the evaluation:
- `known_preference`: the AlpacaEval 2.0 reference output (gpt4_1106_preview) against the 1.0
  reference output (text_davinci_003) for the same instruction; strong judges prefer the first in a
  large majority. But the first is also longer in ~98% of pairs, so a "prefer the longer" rule
  passes this check too: hence
- `matched_vs_mismatched`: an instruction's own answer against the answer to ANOTHER instruction of
  the nearest length (both gpt4_1106_preview); any judge that reads the instruction picks its own
  answer, whatever its length preference. Chance is 50%.
Reported per check: agreement (decisive and right), tie rate, agreement with ties as half, the rate
at which swapping the presentation order flips the verdict, the correlation of verdicts with the
(normalised) length difference, and how often the longer output wins a decisive verdict.
The side of the expected output alternates between pairs so that position bias cannot pass a check.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from lsp.evaluation.judge import order_flipped


@dataclass
class SanityPair:
    check: str  # "known_preference" | "matched_vs_mismatched"
    instruction: str
    output_1: str
    output_2: str
    expected: int  # which output a trustworthy judge prefers: 1 or 2


def _placed(check: str, i: int, instruction: str, good: str, bad: str) -> SanityPair:
    if i % 2 == 0:
        return SanityPair(check, instruction, good, bad, expected=1)
    return SanityPair(check, instruction, bad, good, expected=2)


def known_preference_pairs(strong: Sequence[dict], weak: Sequence[dict], n: int, seed: int) -> list[SanityPair]:
    weak_by = {r["instruction"]: r["output"] for r in weak}
    common = [r for r in strong if r["instruction"] in weak_by and r["output"] != weak_by[r["instruction"]]]
    picked = random.Random(f"{seed}:known").sample(common, min(n, len(common)))
    return [_placed("known_preference", i, r["instruction"], r["output"], weak_by[r["instruction"]])
            for i, r in enumerate(picked)]


def mismatched_pairs(records: Sequence[dict], n: int, seed: int) -> list[SanityPair]:
    """Each sampled instruction's own answer vs the other answer of the nearest length."""
    by_len = sorted(range(len(records)), key=lambda i: len(records[i]["output"]))
    rank = {i: k for k, i in enumerate(by_len)}
    picked = random.Random(f"{seed}:mismatched").sample(range(len(records)), min(n, len(records)))
    pairs = []
    for j, i in enumerate(picked):
        k = rank[i]
        neighbours = [by_len[m] for m in (k - 1, k + 1) if 0 <= m < len(by_len)]
        other = min(neighbours, key=lambda m: abs(len(records[m]["output"]) - len(records[i]["output"])))
        pairs.append(_placed("matched_vs_mismatched", j, records[i]["instruction"],
                             records[i]["output"], records[other]["output"]))
    return pairs


def annotate(judge, rows: Sequence[dict]) -> pd.DataFrame:
    """Pairs judged through alpaca-eval's PairwiseAnnotator with the judge's config and cache."""
    from alpaca_eval.annotators import PairwiseAnnotator

    annotator = PairwiseAnnotator(**judge.annotator_kwargs())
    return pd.DataFrame(annotator.annotate_pairs(list(rows), chunksize=judge.chunksize))


def verdicts(pref: pd.Series) -> np.ndarray:
    """+1 output_1 preferred, -1 output_2 preferred, 0 tie (or no annotation)."""
    p = pd.to_numeric(pref, errors="coerce").to_numpy(dtype=float)
    return np.where(np.isnan(p), 0, np.sign(1.5 - p)).astype(int)


def length_bias(df: pd.DataFrame) -> dict:
    """Correlation of the verdict (+: output_2) with the length difference (+: output_2 longer),
    and the share of decisive verdicts won by the longer output."""
    len1, len2 = df["output_1"].str.len().to_numpy(float), df["output_2"].str.len().to_numpy(float)
    dlen = (len2 - len1) / np.maximum(len1 + len2, 1)
    v = -verdicts(df["preference"])  # +1 when output_2 wins
    corr = float(np.corrcoef(v, dlen)[0, 1]) if v.std() > 0 and dlen.std() > 0 else None
    decisive = (v != 0) & (dlen != 0)
    longer = float((np.sign(dlen[decisive]) == v[decisive]).mean()) if decisive.any() else None
    return {"length_corr": corr, "longer_preferred_rate": longer}


def flip_rate(flips: Sequence[bool | None]) -> float | None:
    known = [f for f in flips if f is not None]
    return float(np.mean(known)) if known else None


def check_metrics(pairs: Sequence[SanityPair], df: pd.DataFrame, flips: Sequence[bool | None]) -> dict:
    v = verdicts(df["preference"])
    want = np.array([1 if p.expected == 1 else -1 for p in pairs])
    len1 = np.array([len(p.output_1) for p in pairs])
    len2 = np.array([len(p.output_2) for p in pairs])
    out = {
        "n": len(pairs),
        "agreement": float((v == want).mean()),
        "tie_rate": float((v == 0).mean()),
        "agreement_ties_half": float(((v == want) + 0.5 * (v == 0)).mean()),
        "flip_rate": flip_rate(flips),
        "expected_longer_rate": float(np.mean(np.where(want == 1, len1 > len2, len2 > len1))),
        **length_bias(df),
    }
    if "preference_raw_completion" in df:
        out["p_valid_mean"] = _mean_p_valid(df["preference_raw_completion"])
    return out


def _mean_p_valid(raw: pd.Series) -> float | None:
    import json

    vals = [json.loads(r).get("p_valid") for r in raw if isinstance(r, str) and r.startswith("{")]
    vals = [x for x in vals if x is not None]
    return float(np.mean(vals)) if vals else None


def run_checks(judge, pairs: Sequence[SanityPair]) -> dict:
    """Judge every pair (and, for a judge that sees one order only, its swapped copy)."""
    rows = [{"instruction": p.instruction, "output_1": p.output_1, "output_2": p.output_2} for p in pairs]
    swapped = [{**r, "output_1": r["output_2"], "output_2": r["output_1"]} for r in rows]
    both = judge.reports_both_orders
    pairs_before, secs_before = getattr(judge, "n_pairs", None), getattr(judge, "seconds", 0.0)
    df = annotate(judge, rows if both else rows + swapped)
    cols = ["instruction", "output_1", "output_2"]
    key = df.drop_duplicates(cols).set_index(cols)
    df_main = key.loc[[(r["instruction"], r["output_1"], r["output_2"]) for r in rows]].reset_index()
    if both:
        flips = [order_flipped(a) for a in df_main.to_dict("records")]
    else:
        df_swap = key.loc[[(r["instruction"], r["output_1"], r["output_2"]) for r in swapped]]
        flips = list(verdicts(df_main["preference"]) != -verdicts(df_swap["preference"]))
    report = {}
    for check in dict.fromkeys(p.check for p in pairs):
        idx = [i for i, p in enumerate(pairs) if p.check == check]
        report[check] = check_metrics([pairs[i] for i in idx], df_main.iloc[idx],
                                      [flips[i] for i in idx])
    if pairs_before is not None:  # the local judge keeps its own count and clock
        new, secs = judge.n_pairs - pairs_before, judge.seconds - secs_before
        report["judging"] = {"new_judgements": new, "judge_seconds": round(secs, 3),
                             "seconds_per_pair": round(secs / new, 3) if new else None}
    report["annotations"] = [{**asdict(p), "preference": _num(a)}
                             for p, a in zip(pairs, df_main["preference"], strict=True)]
    return report


def _num(x) -> float | None:
    x = pd.to_numeric(x, errors="coerce")
    return None if pd.isna(x) else float(x)


def sanity_report(judge, strong: Sequence[dict], weak: Sequence[dict], n_pairs: int, seed: int) -> dict:
    pairs = known_preference_pairs(strong, weak, n_pairs, seed) + mismatched_pairs(strong, n_pairs, seed)
    return run_checks(judge, pairs)


def eval_pair_stats(annotations: pd.DataFrame) -> dict:
    """Order flips and length bias of the judge on the evaluation pairs themselves."""
    flips = [order_flipped(a) for a in annotations.to_dict("records")]
    return {"n": len(annotations), "flip_rate": flip_rate(flips), **length_bias(annotations)}


def _num2(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def pct(x: float | None) -> str:
    """A fraction as a whole percentage ("n/a" for None); the study report uses it too."""
    return "n/a" if x is None else f"{100 * x:.0f}%"


def format_sanity(report: dict, judge_name: str) -> str:
    lines = [f"Judge sanity ({judge_name}):"]
    k, m = report.get("known_preference"), report.get("matched_vs_mismatched")
    if k:
        lines.append(
            f"  known preference (AlpacaEval 2.0 ref > 1.0 ref), n={k['n']}: agreement "
            f"{pct(k['agreement'])}, ties {pct(k['tie_rate'])}, order flips {pct(k['flip_rate'])}, "
            f"length corr {_num2(k['length_corr'])} (a 'prefer the longer' rule would agree "
            f"{pct(k['expected_longer_rate'])})")
    if m:
        lines.append(
            f"  matched vs mismatched answer (chance 50%), n={m['n']}: agreement "
            f"{pct(m['agreement'])}, ties {pct(m['tie_rate'])}, order flips {pct(m['flip_rate'])}")
    if e := report.get("evaluation_pairs"):
        lines.append(f"  on the evaluation pairs, n={e['n']}: order flips {pct(e['flip_rate'])}, "
                     f"longer output preferred {pct(e['longer_preferred_rate'])}")
    if m and m["agreement_ties_half"] < 0.75:
        lines.append("  WARNING: this judge barely tells an answer from an answer to another question;"
                     " its win rates are not evidence of quality.")
    return "\n".join(lines)
