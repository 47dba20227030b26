"""Pooled statistics across seeds: one arm's effect against the base, over S seeds x n prompts.

A study run is `<arm>-<seed>` (`lsp-0`, `grpo-2`; lsp.study.params.run_name); the base model is evaluated under each seed as
`base-<seed>`, and run `<arm>-<s>` is paired with `base-<s>` on the same prompts. Per arm:
- per seed s: the paired difference d_s (points) of a figure (IFEval prompt-level strict / loose,
  instruction-level) between `<arm>-<s>` and `base-<s>`; for AlpacaEval the win rate w_s (%, ties
  half) of `<arm>-<s>` judged against `base-<s>`, itself paired per instruction;
- the pooled estimate: the mean of d_s over seeds;
- a 95% CI from a two-level bootstrap: each replicate draws S seeds with replacement, then, for
  each drawn seed (each occurrence on its own), its n_s prompts with replacement; the replicate is
  the mean of the S resampled statistics; percentile interval over `n_boot` replicates, from a
  fixed RNG seed;
- the seed SD: the sample SD (ddof 1) of the d_s; None with one seed, where the seed level
  contributes nothing (every replicate draws the one seed) and the CI is the prompt bootstrap's.

Every statistic here is a ratio of sums over prompts, sum_i x_i / sum_i w_i (prompt level: x the
0/1 or paired difference, w = 1; instruction level: x the instructions followed, w the number of
instructions: the pooled-over-instructions accuracy lm-eval reports), or a function of several
such sums (the model card's form). A prompt resample is then fully described by how many times
each prompt is drawn, so a replicate is `counts @ columns`: counts (B, n), columns (n, k).

Pure functions of records and arrays (numpy); the report (`lsp.study.report_pooled`) loads the
files, the report stage (`pipelines/report.py`) publishes the headline figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

N_BOOT = 10_000
BOOT_SEED = 0  # the bootstrap's fixed RNG seed: the same inputs give the same CI
CARD_IFEVAL = 29.9  # SmolLM2-135M-Instruct's model card: IFEval, mean of prompt and instruction strict
MULTINOMIAL_MAX = 64  # up to this many distinct prompt rows: draw counts per distinct row

Stat = Callable[[np.ndarray], np.ndarray]  # column sums (B, k) -> statistic (B,)


# ---- statistics of column sums ---------------------------------------------------------------
def ratio(sums: np.ndarray) -> np.ndarray:
    """100 * sum x / sum w: columns [x, w]; sums (B, 2) -> (B,) points / percent."""
    return 100.0 * sums[:, 0] / sums[:, 1]


def card_stat(sums: np.ndarray) -> np.ndarray:
    """The model card's IFEval: the mean of prompt-level and instruction-level strict accuracy.
    Columns [prompt passed, instructions followed, instructions, 1]; sums (B, 4) -> (B,) %."""
    return 50.0 * (sums[:, 0] / sums[:, 3] + sums[:, 1] / sums[:, 2])


# ---- the two-level bootstrap -----------------------------------------------------------------
def prompt_resamples(columns: np.ndarray, size: int, rng: np.random.Generator,
                     max_distinct: int = MULTINOMIAL_MAX) -> np.ndarray:
    """`size` resamples of the n prompts (rows) with replacement, as column sums (size, k).

    Few distinct rows (IFEval's 0/1 outcomes): the draw counts per distinct row are multinomial
    (n, row frequencies), which is the same distribution as drawing n indices, at a fraction of
    the cost. Otherwise (a weighted judge's continuous preferences): n indices per resample,
    counted per prompt in chunks."""
    n = len(columns)
    rows, inverse = np.unique(columns, axis=0, return_inverse=True)  # (U, k), (n,)
    if len(rows) <= max_distinct:
        freq = np.bincount(inverse.ravel(), minlength=len(rows)) / n  # (U,)
        return rng.multinomial(n, freq, size=size) @ rows  # (size, U) @ (U, k)
    out = np.empty((size, columns.shape[1]))
    chunk = max(1, 2_000_000 // n)
    for start in range(0, size, chunk):
        b = min(chunk, size - start)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]  # (b, n) flat
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)  # (b, n)
        out[start:start + b] = counts.astype(float) @ columns  # (b, k)
    return out


def two_level_bootstrap(per_seed: Sequence[np.ndarray], stat: Stat, n_boot: int = N_BOOT,
                        seed: int = BOOT_SEED) -> np.ndarray:
    """Replicates (n_boot,) of the mean over seeds of `stat`: seeds drawn with replacement
    (n_boot, S), then each drawn seed's prompts (its (n_s, k) columns) with replacement,
    independently for each of its occurrences."""
    rng = np.random.default_rng(seed)
    n_seeds = len(per_seed)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # (B, S) seed of each slot
    values = np.empty((n_boot, n_seeds))  # (B, S) the resampled statistic of each slot
    for s, columns in enumerate(per_seed):
        slots = picks == s
        values[slots] = stat(prompt_resamples(columns, int(slots.sum()), rng))
    return values.mean(axis=1)


def pooled(per_seed: Mapping[int, np.ndarray], stat: Stat = ratio, n_boot: int = N_BOOT,
           seed: int = BOOT_SEED) -> dict:
    """Per-seed values, the pooled mean, its two-level bootstrap 95% CI and the seed SD.
    `per_seed`: seed -> (n_s, k) per-prompt columns of that seed's run."""
    seeds = sorted(per_seed)
    if not seeds:
        return {"n_seeds": 0, "seeds": [], "per_seed": {}, "estimate": None, "ci95": None,
                "seed_sd": None}
    cols = [np.asarray(per_seed[s], dtype=float) for s in seeds]
    values = [float(stat(c.sum(axis=0, keepdims=True))[0]) for c in cols]  # (S,)
    boot = two_level_bootstrap(cols, stat, n_boot, seed)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"n_seeds": len(seeds), "seeds": seeds,
            "per_seed": dict(zip(seeds, values, strict=True)),
            "n_prompts": {s: len(c) for s, c in zip(seeds, cols, strict=True)},
            "estimate": float(np.mean(values)), "ci95": [float(lo), float(hi)],
            "seed_sd": float(np.std(values, ddof=1)) if len(seeds) > 1 else None,
            "n_boot": n_boot}


# ---- per-prompt columns from the evaluation records ------------------------------------------
def paired(candidate: Sequence[dict], base: Sequence[dict]) -> list[tuple[dict, dict]]:
    """IFEval records of a run and its seed's base, joined on the prompt `key`."""
    by_key = {r["key"]: r for r in base}
    if set(by_key) != {r["key"] for r in candidate}:
        raise ValueError("a run and its base must answer the same IFEval prompts")
    return [(r, by_key[r["key"]]) for r in candidate]


def ifeval_columns(pairs: Sequence[tuple[dict, dict]], mode: str, level: str) -> np.ndarray:
    """(n, 2) columns [x, w] of the paired difference, run minus base: prompt level
    x = passed(run) - passed(base) in {-1, 0, 1}, w = 1; instruction level x = the difference in
    instructions followed, w = the prompt's instructions."""
    if level == "prompt":
        rows = [(float(all(r[mode])) - float(all(b[mode])), 1.0) for r, b in pairs]
    else:
        rows = [(float(sum(map(bool, r[mode])) - sum(map(bool, b[mode]))), float(len(r[mode])))
                for r, b in pairs]
    return np.array(rows, dtype=float).reshape(-1, 2)


def card_columns(records: Sequence[dict]) -> np.ndarray:
    """(n, 4) columns of `card_stat` from one model's IFEval records (strict)."""
    return np.array([(float(all(r["strict"])), float(sum(map(bool, r["strict"]))),
                      float(len(r["strict"])), 1.0) for r in records], dtype=float).reshape(-1, 4)


def preference_columns(preferences: Sequence[float]) -> np.ndarray:
    """(n, 2) columns [score, 1] from alpaca-eval preferences (1 base wins, 2 candidate wins, 1.5
    or 0 a tie, weighted judges in between): score = preference - 1, so the ratio is alpaca-eval's
    `win_rate` (ties half). Non-preferences (NaN, out of [1, 2]) are dropped, as alpaca-eval does."""
    p = np.asarray(preferences, dtype=float)
    p = np.where(p == 0.0, 1.5, p)
    p = p[(p >= 1.0) & (p <= 2.0)]  # NaN fails both comparisons
    return np.stack([p - 1.0, np.ones_like(p)], axis=1)


# ---- what the report pools ---------------------------------------------------------------------
IFEVAL_SPLITS = ("all", "seen", "held_out")
IFEVAL_FIGURES = {f"{level}_{mode}": (level, mode)
                  for level in ("prompt", "instruction") for mode in ("strict", "loose")}


def split_pairs(pairs: Sequence[tuple[dict, dict]], held_out: Sequence[str]
                ) -> dict[str, list[tuple[dict, dict]]]:
    """all / seen (every instruction type one training may draw) / held_out (at least one type
    training never draws): the rule of lsp.evaluation.ifeval.split_by_types."""
    held = set(held_out)
    out: dict[str, list] = {"all": list(pairs), "seen": [], "held_out": []}
    for pair in pairs:
        out["held_out" if set(pair[0]["instruction_id_list"]) & held else "seen"].append(pair)
    return out


def ifeval_pooled(runs: Mapping[int, tuple[Sequence[dict], Sequence[dict]]],
                  held_out: Sequence[str], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """One arm's IFEval: seed -> (its run's records, base-<seed>'s records) ->
    split -> figure (prompt_strict, ..., instruction_loose) -> `pooled` (points)."""
    parts = {s: split_pairs(paired(run, base), held_out) for s, (run, base) in runs.items()}
    out: dict = {}
    for split in IFEVAL_SPLITS:
        out[split] = {}
        for name, (level, mode) in IFEVAL_FIGURES.items():
            cols = {s: ifeval_columns(p[split], mode, level) for s, p in parts.items()
                    if p[split]}
            out[split][name] = pooled(cols, ratio, n_boot, seed)
    return out


def card_pooled(bases: Mapping[int, Sequence[dict]], n_boot: int = N_BOOT,
                seed: int = BOOT_SEED) -> dict:
    """The base in the model card's form, per seed and pooled (%, beside CARD_IFEVAL)."""
    out = pooled({s: card_columns(r) for s, r in bases.items()}, card_stat, n_boot, seed)
    return {**out, "card": CARD_IFEVAL}


def alpaca_pooled(runs: Mapping[int, Sequence[tuple[str, float]]], n_boot: int = N_BOOT,
                  seed: int = BOOT_SEED) -> dict:
    """One arm's AlpacaEval: seed -> (subset, preference) per instruction judged against
    base-<seed> -> {"overall": pooled win rate (%), "subsets": subset -> pooled}."""
    overall = {s: preference_columns([p for _, p in rows]) for s, rows in runs.items()}
    subsets = sorted({name for rows in runs.values() for name, _ in rows})
    per_subset = {}
    for name in subsets:
        cols = {s: preference_columns([p for sub, p in rows if sub == name])
                for s, rows in runs.items()}
        per_subset[name] = pooled({s: c for s, c in cols.items() if len(c)}, ratio, n_boot, seed)
    return {"overall": pooled({s: c for s, c in overall.items() if len(c)}, ratio, n_boot, seed),
            "subsets": per_subset}
