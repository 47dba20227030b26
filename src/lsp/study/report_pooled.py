"""The study report's pooled part: per seed and pooled over seeds, each arm against the base.

Loads the per-prompt evaluation records of every run `<arm>-<seed>` and of `base-<seed>`
(`<ifeval_dir>/<run>/records.jsonl`; AlpacaEval's per-instruction judgements in
`<eval_dir>/vs_base/annotations.json`, judged against `base-<seed>`), pools them with
`lsp.study.pooled`, and writes the sections: the protocol's primary endpoint (quoted from
docs/protocol.md), the pooled IFEval and AlpacaEval tables (one row per seed, one pooled row per
arm), the base in the model card's form, and which reward signal drives training.

A run without a seed suffix (the layout before seeds: `lsp`, paired with `base`) counts as seed 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lsp.evaluation.ifeval import read_records
from lsp.study import pooled as P
from lsp.study.markdown import table
from lsp.study.params import run_name, split_run

if TYPE_CHECKING:  # only for annotations: lsp.study.report imports this module
    from lsp.study.report import Arm

BASE = "base"
SELF_PLAY = ("lsp", "lsp_zero")  # the arms the primary endpoint compares with the base
PRIMARY = ("seen", "prompt_loose")  # docs/protocol.md: seen-type prompt-level loose, pooled


# ---- loading -----------------------------------------------------------------------------------
def seed_of(name: str) -> int:
    return split_run(name)[1] or 0


def base_of(name: str) -> str:
    """The base run a run is paired with: `base-<its seed>`, or `base` for an unsuffixed name."""
    seed = split_run(name)[1]
    return BASE if seed is None else run_name(BASE, seed)


def arms_of(names: Sequence[str]) -> dict[str, dict[int, str]]:
    """arm -> seed -> run, in the order the names come (the base excluded)."""
    out: dict[str, dict[int, str]] = {}
    for name in names:
        arm, seed = split_run(name)
        if arm != BASE:
            out.setdefault(arm, {})[seed or 0] = name
    return out


def _records(ifeval_dir: Path | None, name: str) -> list[dict] | None:
    path = Path(ifeval_dir or "") / name / "records.jsonl"
    return read_records(path) if ifeval_dir and path.is_file() else None


def preferences(eval_dir: Path | None) -> list[tuple[str, float]] | None:
    """(subset, preference) per judged instruction, from alpaca-eval's annotations.json (the
    candidate is output_2, the seed's base output_1)."""
    path = Path(eval_dir or "") / "vs_base" / "annotations.json"
    if not eval_dir or not path.is_file():
        return None
    rows = json.loads(path.read_text())
    col = "dataset" if rows and "dataset" in rows[0] else "dataset_2"
    return [(str(r.get(col) or "all"), float("nan") if r.get("preference") is None
             else float(r["preference"])) for r in rows]


def held_out_types(ifeval_dir: Path | None, names: Sequence[str]) -> list[str]:
    """The held-out instruction types the IFEval stage split on (its details.json), else the
    training default (lsp.selfplay.constraints.HELD_OUT_TYPES)."""
    for name in names:
        path = Path(ifeval_dir or "") / name / "details.json"
        if ifeval_dir and path.is_file():
            found = (json.loads(path.read_text()).get("splits") or {}).get("held_out_types")
            if found is not None:
                return list(found)
    from lsp.selfplay.constraints import HELD_OUT_TYPES

    return list(HELD_OUT_TYPES)


def compute(names: Sequence[str], ifeval_dir: Path | None, eval_dirs: Mapping[str, Path],
            n_boot: int = P.N_BOOT) -> dict:
    """Everything the pooled sections show (and pooled.json holds): per arm its runs, IFEval
    (split -> figure -> pooled) and AlpacaEval pooled; the base's card form; what was missing."""
    arms, missing = arms_of(names), []
    bases = {seed_of(r): base_of(r) for runs in arms.values() for r in runs.values()}
    base_records = {s: _records(ifeval_dir, b) for s, b in bases.items()}
    held = held_out_types(ifeval_dir, [*bases.values(), *names])
    out: dict = {"arms": {}, "held_out_types": held, "n_boot": n_boot, "missing": missing}
    for arm, runs in arms.items():
        ife, alp = {}, {}
        for seed, run in runs.items():
            records = _records(ifeval_dir, run)
            if records is not None and base_records.get(seed) is not None:
                ife[seed] = (records, base_records[seed])
            for name, got in ((run, records), (bases[seed], base_records.get(seed))):
                if ifeval_dir and got is None and name not in missing:
                    missing.append(name)  # no IFEval records: the seed is not pooled
            prefs = preferences(eval_dirs.get(run))
            if prefs is not None:
                alp[seed] = prefs
        out["arms"][arm] = {"runs": runs, "ifeval": P.ifeval_pooled(ife, held, n_boot),
                            "alpaca": P.alpaca_pooled(alp, n_boot)}
    found = {s: r for s, r in base_records.items() if r is not None}
    out["base"] = {"runs": {s: bases[s] for s in found}, "card": P.card_pooled(found, n_boot)}
    return out


# ---- formatting --------------------------------------------------------------------------------
def _signed(x) -> str:
    return "-" if x is None else f"{x:+.1f}"


def _plain(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def pooled_cell(p: Mapping, fmt=_signed) -> str:
    """estimate [95% CI], seed SD (n/a with one seed, where the CI is the prompts' alone)."""
    if not p or p.get("estimate") is None:
        return "-"
    lo, hi = p["ci95"]
    sd = "n/a" if p.get("seed_sd") is None else f"{p['seed_sd']:.1f}"
    return f"{fmt(p['estimate'])} [{fmt(lo)}, {fmt(hi)}], SD {sd}"


def _per_seed(p: Mapping, seed: int, fmt=_signed) -> str:
    return fmt((p or {}).get("per_seed", {}).get(seed))


def _rows(stats: Mapping, cells, pooled_of) -> list[list[str]]:
    """Per arm: one row per run (its seed's value), then the pooled row. `cells(arm, seed)` gives
    a row's cells (seed None: the pooled ones); `pooled_of(arm)` the pooled figures whose
    largest seed count the row shows."""
    rows = []
    for arm, a in stats["arms"].items():
        for seed, run in a["runs"].items():
            rows.append([run, "", *cells(arm, seed)])
        n = max([p.get("n_seeds", 0) for p in pooled_of(arm)] or [0])
        rows.append([f"**{arm}** pooled", str(n), *cells(arm, None)])
    return rows


IFEVAL_COLUMNS = [(split, f"prompt_{mode}") for split in P.IFEVAL_SPLITS
                  for mode in ("strict", "loose")]


def ifeval_table(stats: Mapping) -> list[str]:
    def cells(arm, seed):
        figs = stats["arms"][arm]["ifeval"]
        return [pooled_cell(figs[s][f]) if seed is None else _per_seed(figs[s][f], seed)
                for s, f in IFEVAL_COLUMNS]

    header = ["Run", "n seeds", *(f"{s.replace('_', '-')} {f.split('_')[1]}"
                                  for s, f in IFEVAL_COLUMNS)]
    return table(header, _rows(stats, cells, lambda arm: [
        stats["arms"][arm]["ifeval"][s][f] for s, f in IFEVAL_COLUMNS]))


def alpaca_table(stats: Mapping) -> list[str]:
    subsets = sorted({s for a in stats["arms"].values() for s in a["alpaca"]["subsets"]})

    def cells(arm, seed):
        alp = stats["arms"][arm]["alpaca"]
        blocks = [alp["overall"], *(alp["subsets"].get(s, {}) for s in subsets)]
        return [pooled_cell(b, _plain) if seed is None else _per_seed(b, seed, _plain)
                for b in blocks]

    return table(["Run", "n seeds", "overall", *subsets],
                 _rows(stats, cells, lambda arm: [stats["arms"][arm]["alpaca"]["overall"]]))


def card_table(stats: Mapping) -> list[str]:
    card = stats["base"]["card"]
    rows = [[run, _plain(card["per_seed"].get(s))] for s, run in stats["base"]["runs"].items()]
    rows.append([f"**base** pooled ({card['n_seeds']} seeds)", pooled_cell(card, _plain)])
    rows.append(["SmolLM2-135M-Instruct model card (lighteval)", _plain(card["card"])])
    if card["estimate"] is not None:
        rows.append(["Gap: pooled base minus the card", _signed(card["estimate"] - card["card"])])
    return table(["Model", "IFEval, card form (%)"], rows)


# ---- sections ----------------------------------------------------------------------------------
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
LABEL = re.compile(r"\*\*primary endpoint", re.IGNORECASE)  # "- **Primary endpoint.** ..."
ITEM = re.compile(r"^(\s*)(?:[-*+]|\d+[.)])\s")


def primary_endpoint_text(path: Path) -> list[str] | None:
    """docs/protocol.md's primary endpoint as written: a section headed "Primary endpoint" (to
    the next heading of the same or a higher level), else the list item or paragraph that opens
    with the bold label **Primary endpoint**. None when the file has neither."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        found = HEADING.match(line)
        if found and "primary endpoint" in found[2].lower():
            level = len(found[1])
            end = next((j for j in range(i + 1, len(lines)) if (h := HEADING.match(lines[j]))
                        and len(h[1]) <= level), len(lines))
            return lines[i:end]
    hit = next((i for i, line in enumerate(lines) if LABEL.search(line)), None)
    return None if hit is None else _block(lines, hit)


def _block(lines: list[str], i: int) -> list[str]:
    """The list item opening at line i (up to the next item at its indent or less), or the
    paragraph holding line i; a blank line or a heading ends either."""
    item = ITEM.match(lines[i])
    start = i
    while not item and start > 0 and lines[start - 1].strip() and not HEADING.match(lines[start - 1]):
        start -= 1
    end = i + 1
    while end < len(lines) and lines[end].strip() and not HEADING.match(lines[end]):
        nxt = ITEM.match(lines[end])
        if item and nxt and len(nxt[1]) <= len(item[1]):
            break
        end += 1
    return lines[start:end]


def protocol_section(path: Path | None) -> list[str]:
    out = ["## Protocol: the primary endpoint", ""]
    if path is None or not Path(path).is_file():
        return out + [f"**The protocol is missing** (`{path or 'docs/protocol.md'}` not found): "
                      "the primary endpoint was not fixed in writing before this run.", ""]
    text = primary_endpoint_text(Path(path))
    if text is None:
        return out + [f"**`{path}` names no primary endpoint** (no \"Primary endpoint\" "
                      "section).", ""]
    while text and not text[-1].strip():
        text = text[:-1]
    return out + [f"Quoted verbatim from `{path}`:", "",
                  *(f"> {line}".rstrip() for line in text), ""]


def primary_lines(stats: Mapping) -> list[str]:
    """The primary endpoint per self-play arm (the control beside them): seen-type prompt-level
    loose, pooled over seeds, against the base."""
    split, figure = PRIMARY
    out = []
    for arm, a in stats["arms"].items():
        p = a["ifeval"][split][figure]
        if p.get("estimate") is None:
            out.append(f"- {arm}: no IFEval records to pool.")
            continue
        lo, hi = p["ci95"]
        verdict = ("the CI excludes zero" if lo > 0 or hi < 0 else "the CI includes zero")
        role = "" if arm in SELF_PLAY else " (control)"
        out.append(f"- **{arm}**{role}: {p['estimate']:+.1f} points, 95% CI [{lo:+.1f}, "
                   f"{hi:+.1f}] (half-width {(hi - lo) / 2:.1f}), seed SD "
                   f"{'n/a' if p['seed_sd'] is None else format(p['seed_sd'], '.1f')}, "
                   f"{p['n_seeds']} seed(s): {verdict}.")
    return out + [""] if out else []


def pooled_section(stats: Mapping) -> list[str]:
    out = ["## Pooled over seeds: each arm against the base", ""]
    if not stats["arms"]:
        return out + ["No arm runs (`<arm>-<seed>`) to pool.", ""]
    if not has_data(stats):
        return out + ["No per-prompt records to pool (`<ifeval>/<run>/records.jsonl`, "
                      "`<evaluate>/<run>/vs_base/annotations.json`).", ""]
    held = stats["held_out_types"]
    out += ["Primary endpoint (IFEval, seen-type prompts, prompt-level loose, paired against "
            "`base-<seed>`, pooled over seeds):", "", *primary_lines(stats)]
    out += ["Per run: the paired difference against the base of the same seed (points). Pooled: "
            "the mean over seeds [95% CI from a two-level bootstrap: seeds with replacement, then "
            f"each drawn seed's prompts with replacement; {stats['n_boot']} replicates, "
            "percentile], SD = the seed-to-seed SD of the per-seed differences (n/a with one "
            "seed: the CI then reflects the prompts alone). Seen = every instruction of the "
            f"prompt is of a type training may draw; held-out = at least one of the {len(held)} "
            "types it never draws.", "", "**IFEval, prompt-level Δ vs base (points)**", ""]
    out += ifeval_table(stats)
    out += ["**AlpacaEval win rate vs base (%, ties ½; 50 = no difference)**", ""]
    if any(a["alpaca"]["overall"]["n_seeds"] for a in stats["arms"].values()):
        out += alpaca_table(stats)
    else:
        out += ["No per-instruction judgements to pool "
                "(`<evaluate>/<run>/vs_base/annotations.json`).", ""]
    out += ["**The base in the model card's form** (IFEval = mean of prompt-level and "
            "instruction-level strict accuracy, as SmolLM2-135M-Instruct's card reports it, with "
            "lighteval; here lm-eval's checkers on the embedded model):", ""]
    out += card_table(stats)
    if stats["missing"]:
        out += ["Seeds not pooled for want of IFEval records (`records.jsonl`) of: "
                f"{', '.join(stats['missing'])}.", ""]
    return out


def has_data(stats: Mapping) -> bool:
    figures = [p for a in stats["arms"].values()
               for p in (*(f for sp in a["ifeval"].values() for f in sp.values()),
                         a["alpaca"]["overall"])]
    return stats["base"]["card"]["n_seeds"] > 0 or any(p["n_seeds"] for p in figures)


# ---- which signal drives training -----------------------------------------------------------
SIGNALS = {"solver/reward_group_std": "R (the reward)",
           "self_reward/group_std": "R_Q (self-reward)",
           "solver/total_reward_group_std": "R + w R_Q (the Solver's advantage)",
           "solver/reward_std": "R, overall std", "self_reward/std": "R_Q, overall std"}
COMPONENT = re.compile(r"^reward/(?P<name>.+)_group_std$")


def signal_keys(arms: Sequence[Arm]) -> list[str]:
    """The within-group std metrics any run logged: R, its components, R_Q, the total; then the
    overall stds (between and within groups) for comparison."""
    found = {k for a in arms for row in a.history for k, v in row.items() if v is not None}
    components = sorted(k for k in found if COMPONENT.match(k))
    keys = ["solver/reward_group_std", *components, *list(SIGNALS)[1:]]
    return [k for k in keys if k in found]


def _label(key: str) -> str:
    found = COMPONENT.match(key)
    return f"{found['name']} (part of R)" if found else SIGNALS[key]


def _mean_over_training(runs: Sequence[Arm], key: str) -> str:
    """Mean over each run's logged steps, then over the arm's runs."""
    means = [sum(v) / len(v) for a in runs
             if (v := [r[key] for r in a.history if r.get(key) is not None])]
    return "-" if not means else f"{sum(means) / len(means):.3f}"


def _weights(run: Arm) -> str:
    c = run.config or {}
    parts = [f"{n} {(spec or {}).get('weight', '?')}"
             for n, spec in ((c.get("reward") or {}).get("components") or {}).items()]
    sr = (c.get("algo") or {}).get("self_reward") or {}
    if sr.get("enabled"):
        parts.append(f"R_Q {sr.get('weight', '?')}")
    return ", ".join(parts) or "-"


def signal_section(arms: Sequence[Arm]) -> list[str]:
    out = ["### Which signal drives training", ""]
    trained = [a for a in arms if a.history]
    keys = signal_keys(trained)
    if not keys:
        return out + ["No reward spreads in any `history.csv`.", ""]
    by_arm: dict[str, list[Arm]] = {}
    for a in trained:
        by_arm.setdefault(split_run(a.name)[0], []).append(a)
    rows = [[arm, str(len(runs)), _weights(runs[0]),
             *(_mean_over_training(runs, k) for k in keys)] for arm, runs in by_arm.items()]
    out += ["The Solver learns from the spread of rewards within a query's group (its advantage "
            "is the reward minus the group mean), so the signal that drives training is the one "
            "with the larger within-group std: the mean over queries of each reward's std within "
            "the group, averaged over the logged steps and the arm's runs (components "
            "unweighted; R = Σ weight × component). The overall std also counts the spread "
            "between queries, which a group baseline removes.", ""]
    out += table(["Arm", "runs", "weights", *(_label(k) for k in keys)], rows)
    if not any(k.endswith("group_std") for k in keys):
        out += ["These runs predate the within-group metrics (`*_group_std`, "
                "lsp.selfplay.metrics): only the overall stds are shown.", ""]
    return out
