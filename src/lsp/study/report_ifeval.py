"""The study report's IFEval part: a table of the four official figures per model (with SEs) and
the paired difference against the base of the same seed, and a per-instruction-type bar chart
(each arm, averaged over its seeds, vs the base).

Reads `<ifeval_dir>/<name>/details.json` as `python -m lsp.ifeval` / `pipelines/ifeval.py` write
it, for every run `<arm>-<seed>` and the base under each seed `base-<seed>` (`base` for runs
without a seed suffix); a missing model is listed, not an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from lsp.evaluation.ifeval import HEADLINE
from lsp.study.markdown import table
from lsp.study.params import split_run
from lsp.study.report_pooled import base_of, seed_of

COLUMNS = ("prompt strict", "instruction strict", "prompt loose", "instruction loose")


def models(names: list[str]) -> list[str]:
    """The runs and their bases, seed by seed: base-0, lsp-0, grpo-0, base-1, ..."""
    bases = {seed_of(n): base_of(n) for n in names} or {0: "base"}
    return [m for s in sorted(bases) for m in (bases[s], *(n for n in names if seed_of(n) == s))]


def load(ifeval_dir: Path | None, names: list[str]) -> dict[str, dict]:
    """name -> details, for every run and base that has one (`models` order)."""
    if ifeval_dir is None:
        return {}
    found = {}
    for name in models(names):
        path = Path(ifeval_dir) / name / "details.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def _pm(d: dict, key: str) -> str:
    return f"{100 * d[key]:.1f} ± {100 * d[key + '_se']:.1f}"


def _delta(d: dict, mode: str) -> str:
    v = d.get("vs_base", {}).get(mode)
    if v is None:
        return "-"
    lo, hi = v["ci95"]
    return (f"{100 * v['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"p = {v['mcnemar_p']:.2g} ({v['wins']}+/{v['losses']}-)")


def section(results: dict[str, dict], names: list[str], png: Path | None) -> list[str]:
    out = ["## Results: IFEval (program-verified instruction following)", ""]
    if not results:
        return out + ["No IFEval results (`artifacts/ifeval/<name>/details.json`).", ""]
    missing = [n for n in models(names) if n not in results]
    n = next(iter(results.values()))["n_prompts"]
    out += [f"{n} prompts, scored by lm-eval's official IFEval checkers (no judge): accuracy in %, "
            "± one standard error (instruction level: clustered by prompt). Δ = the paired "
            "prompt-level difference against the base of the same seed in points, [bootstrap "
            "95% CI over prompts], exact McNemar p (prompts won+/lost-).", ""]
    header = ["Model", *COLUMNS, "Δ prompt strict", "Δ prompt loose", "truncated"]
    rows = [[name, *(_pm(d, k) for k in HEADLINE), _delta(d, "strict"), _delta(d, "loose"),
             "n/a" if d.get("n_truncated") is None else f"{d['n_truncated']}/{d['n_prompts']}"]
            for name, d in results.items()]
    out += table(header, rows)
    if missing:
        out += [f"Missing: {', '.join(missing)}.", ""]
    out += split_table(results)
    if png:
        out += [f"![IFEval accuracy per instruction type]({png.name})", ""]
    return out


def split_table(results: dict[str, dict]) -> list[str]:
    """Prompts whose instruction types training may draw (seen) vs prompts with a type it never
    draws (held out, lsp.selfplay.constraints.HELD_OUT_TYPES): in-distribution and transfer."""
    rows = []
    for name, d in results.items():
        for split in ("seen", "held_out"):
            part = d.get("splits", {}).get(split)
            if not part or not part.get("n_prompts"):
                continue
            rows.append([name, split.replace("_", "-"), str(part["n_prompts"]),
                         _pm(part, "prompt_level_strict"), _pm(part, "prompt_level_loose"),
                         _delta(part, "strict"), _delta(part, "loose")])
    if not rows:
        return []
    held = next(d["splits"]["held_out_types"] for d in results.values() if "splits" in d)
    header = ["Model", "types", "prompts", "prompt strict", "prompt loose", "Δ prompt strict",
              "Δ prompt loose"]
    return [f"By instruction type: seen = every instruction of the prompt is of a type the "
            f"constraint reward may draw in training; held-out = at least one of the "
            f"{len(held)} types it never draws ({', '.join(t.split(':')[-1] for t in held)}).",
            "", *table(header, rows)]


def per_arm_types(results: dict[str, dict], mode: str) -> dict[str, dict[str, float]]:
    """arm (the base too) -> instruction type -> accuracy (%), averaged over the arm's seeds."""
    sums: dict[str, dict[str, list[float]]] = {}
    for name, d in results.items():
        arm = sums.setdefault(split_run(name)[0], {})
        for t, v in d["per_type"].items():
            arm.setdefault(t, []).append(100 * v[mode])
    return {arm: {t: sum(v) / len(v) for t, v in types.items()} for arm, types in sums.items()}


def plot_types(results: dict[str, dict], path: Path, colors: dict[str, str],
               mode: str = "loose") -> Path | None:
    """Instruction-level accuracy per instruction type, one bar per arm (base first), each the
    mean over the arm's seeds."""
    arms = per_arm_types(results, mode)
    if "base" not in arms or len(arms) < 2:
        return None
    types = sorted(arms["base"])
    arms = {"base": arms.pop("base"), **arms}
    fig = Figure(figsize=(max(8, 0.45 * len(types) * len(arms)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(arms)
    for i, (name, acc) in enumerate(arms.items()):
        values = [acc.get(t, 0.0) for t in types]
        ax.bar([x + i * width for x in range(len(types))], values, width, label=name,
               color="0.6" if name == "base" else colors.get(name))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(types))])
    ax.set_xticklabels([t.split(":")[-1] for t in types], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"instructions followed, {mode} (%)")
    ax.set_ylim(0, 100)
    ax.set_title("IFEval accuracy per instruction type (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
