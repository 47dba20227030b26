"""`python -m lsp.report`: the study report, Markdown with PNG plots, the pipeline's last stage.

Reads, per run `<arm>-<seed>` (lsp-0, lsp_zero-1, grpo-2, ...; a name without a seed suffix is a
run too), what the earlier stages wrote: the training run folder (`history.csv`, `samples.jsonl`,
`config.yaml`), the checkpoint selection (`selection.json`), the AlpacaEval evaluation
(`details.json`, per-instruction judgements in `vs_base/annotations.json`) and IFEval
(`<ifeval>/<run>/details.json`, `records.jsonl`, with the base under each seed `base-<seed>`).
Any of them may be missing (eval not run, no GRPO arm): the report is still written and says
what is missing. Writes `<out>/report.md`, `pooled.json` (the statistics pooled over seeds,
`lsp.study.pooled`), `training_curves.png`, `win_rates.png`, `selection.png` (and
`ifeval_types.png` with IFEval results). Example:
    python -m lsp.report --train-dir lsp-0=artifacts/train/lsp-0 \
        --select-dir lsp-0=artifacts/select/lsp-0 --eval-dir lsp-0=artifacts/evaluate/lsp-0 \
        --out artifacts/report
    python -m lsp.report --root artifacts --out artifacts/report   # every run found under root

Here: loading, figures, assembly and the CLI. The Markdown sections are in
`lsp.study.report_sections`, `report_ifeval` and `report_pooled` (per seed and pooled, the
protocol's primary endpoint, which signal drives training), the table and code-fence helpers in
`lsp.study.markdown`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lsp.errors import exit_on_input_error
from lsp.io import atomic_write_json, read_jsonl
from lsp.selfplay.callbacks import read_history
from lsp.study import report_ifeval, report_pooled
from lsp.study import timings as stage_timings
from lsp.study.markdown import table
from lsp.study.params import split_run
from lsp.study.plots import arm_colors, plot_selection, plot_training_curves, plot_win_rates
from lsp.study.report_sections import (
    baselines,
    evaluated_step,
    judge_is_weak,
    judge_name,
    pick_steps,
    queries_section,
    results_section,
    sanity_verdict,
    selection_section,
    training_section,
)

# pick_steps and sanity_verdict moved to report_sections: re-exported for callers of this module.
__all__ = ["TITLE", "Arm", "build_report", "discover", "load_arm", "main", "parse_args",
           "pick_steps", "render_markdown", "sanity_verdict"]

TITLE = "Language Self-Play study report"


@dataclass
class Arm:
    """One arm's inputs as read: `history` one dict per logged step (metric -> value),
    `samples` one dict per answer (the query repeated), `config`/`selection`/`metrics` the
    parsed config.yaml, selection.json and details.json."""

    name: str
    train_dir: Path | None = None
    select_dir: Path | None = None
    eval_dir: Path | None = None
    history: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    config: dict | None = None
    selection: dict | None = None
    metrics: dict | None = None
    missing: list[str] = field(default_factory=list)  # what the report could not read, and why


# ---- loading ---------------------------------------------------------------------------------
def _file(folder: Path | None, name: str) -> Path | None:
    """`folder/name`, or `folder` itself when the caller passed the file."""
    if folder is None:
        return None
    return folder if folder.is_file() else folder / name


def _read(path: Path | None, reader, arm: Arm, what: str):
    """reader(path), or None with a note in `arm.missing` when a given path cannot be read (no
    path given is no note: each section says what it lacks)."""
    if path is None:
        return None
    if not path.is_file():
        arm.missing.append(f"{what}: `{path}` does not exist")
        return None
    try:
        return reader(path)
    except (ValueError, KeyError, OSError, yaml.YAMLError) as err:
        arm.missing.append(f"{what}: `{path}` unreadable ({type(err).__name__}: {err})")
        return None


def load_arm(name: str, train_dir: Path | None, select_dir: Path | None,
             eval_dir: Path | None) -> Arm:
    arm = Arm(name, train_dir, select_dir, eval_dir)
    arm.history = _read(_file(train_dir, "history.csv"), read_history, arm, "history") or []
    arm.samples = _read(_file(train_dir, "samples.jsonl"), read_jsonl, arm, "samples") or []
    config = train_dir / "config.yaml" if train_dir else None
    if config and config.is_file():  # optional: older runs or other trainers may lack it
        arm.config = _read(config, _read_mapping, arm, "run config")
    arm.selection = _read(_file(select_dir, "selection.json"), _read_mapping, arm, "selection")
    arm.metrics = _read(_file(eval_dir, "details.json"), _read_mapping, arm, "evaluation")
    return arm


def _read_mapping(path: Path) -> dict:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("not a mapping")
    return data


# ---- provenance and assembly -----------------------------------------------------------------
def _where(path: Path | None, name: str) -> str:
    f = _file(path, name)
    if f is None:
        return "-"
    return f"`{f}`" if f.is_file() else f"`{f}` (missing)"


def provenance_section(arms: list[Arm], figures: dict[str, Path | None]) -> list[str]:
    rows = [[a.name, _where(a.train_dir, "history.csv"), _where(a.train_dir, "samples.jsonl"),
             _where(a.select_dir, "selection.json"), _where(a.eval_dir, "details.json")]
            for a in arms]
    made = [p.name for p in figures.values() if p]
    return [
        "## How this report was produced", "",
        "`python -m lsp.report` (`lsp.study.report.build_report`) from these files:", "",
        *table(["Arm", "Training curves", "Sample table", "Selection", "Evaluation"], rows),
        "- `history.csv`: one row per training step (`lsp.selfplay.callbacks.MetricsHistory`; for a "
        "resumed run the last row of a repeated step is used).",
        "- `samples.jsonl`: queries, answers and rewards at step 1 and every n steps "
        "(`lsp.selfplay.callbacks.SampleTable`).",
        "- `selection.json`: `python -m lsp.select`; `details.json`: `python -m lsp.evaluate` "
        "(alpaca-eval's `get_winrate` overall and per subset; sanity from "
        "`lsp.evaluation.sanity`).",
        f"- Figures: {', '.join(made) if made else 'none (no inputs to plot)'}.", "",
    ]


def missing_section(arms: list[Arm]) -> list[str]:
    notes = [f"- {a.name}: {m}" for a in arms for m in a.missing]
    if not notes:
        return []
    return ["**Missing inputs** (the sections below say what they could not show):", "", *notes, ""]


def render_figures(arms: list[Arm], out_dir: Path, ifeval: dict | None = None
                   ) -> dict[str, Path | None]:
    colors = arm_colors([a.name for a in arms])
    keys = baselines(arms)
    results = {a.name: a.metrics[keys[0]] for a in arms
               if keys and a.metrics and keys[0] in a.metrics}
    judges = sorted({judge_name(a.metrics.get("judge")) for a in arms if a.name in results})
    weak = any(judge_is_weak(a.metrics.get("judge")) for a in arms if a.name in results)
    note = f"judge: {', '.join(judges)}" + (
        " -- a weak embedded judge: NOT evidence of quality" if weak else "")
    labels = {a.name: a.name if step is None else f"{a.name} (step {step})"
              for a in arms for step in [evaluated_step(a)]}
    for name in ("training_curves.png", "win_rates.png", "selection.png", "ifeval_types.png"):
        (out_dir / name).unlink(missing_ok=True)  # never leave a stale figure beside the report
    return {
        "curves": plot_training_curves({a.name: a.history for a in arms},
                                       out_dir / "training_curves.png", colors),
        "win_rates": plot_win_rates(results, out_dir / "win_rates.png", colors,
                                    keys[0][3:] if keys else "base", note, weak, labels),
        "selection": plot_selection({a.name: a.selection for a in arms},
                                    out_dir / "selection.png", colors),
        "ifeval_types": report_ifeval.plot_types(ifeval or {}, out_dir / "ifeval_types.png",
                                                 colors),
    }


def render_markdown(arms: list[Arm], figures: dict[str, Path | None], title: str,
                    n_steps: int = 3, per_step: int = 3, ifeval: dict | None = None,
                    pooled: dict | None = None, protocol: Path | None = None) -> str:
    """The report; `pooled` (report_pooled.compute) adds the protocol's primary endpoint and the
    per-seed and pooled tables before the per-model results."""
    lines = [f"# {title}", "", f"Runs: {', '.join(a.name for a in arms) or 'none'}.", ""]
    lines += missing_section(arms)
    if pooled is not None:
        lines += report_pooled.protocol_section(protocol)
        lines += report_pooled.pooled_section(pooled)
    if ifeval is not None:
        lines += report_ifeval.section(ifeval, [a.name for a in arms], figures.get("ifeval_types"))
    lines += results_section(arms, figures.get("win_rates"))
    lines += training_section(arms, figures.get("curves"))
    lines += report_pooled.signal_section(arms)
    lines += queries_section(arms, n_steps, per_step)
    lines += selection_section(arms, figures.get("selection"))
    lines += provenance_section(arms, figures)
    return "\n".join(lines).rstrip() + "\n"


def _path(p) -> Path | None:
    return Path(p) if p else None


def build_report(train_dirs: dict[str, Path], select_dirs: dict[str, Path],
                 eval_dirs: dict[str, Path], out_dir: Path, title: str = TITLE,
                 sample_steps: int = 3, queries_per_step: int = 3,
                 ifeval_dir: Path | None = None, protocol: Path | None = None,
                 n_boot: int = report_pooled.P.N_BOOT, timings_dir: Path | None = None) -> Path:
    """Writes `out_dir/report.md`, its PNGs and `pooled.json` (the pooled statistics); returns
    the Markdown's path. Runs (`<arm>-<seed>`) are the union of the three mappings' keys, in
    that order; any input may be missing. `ifeval_dir` holds `<name>/details.json` and
    `records.jsonl` for `base-<seed>` and the runs; `protocol` is docs/protocol.md;
    `timings_dir` the stages' wall times (lsp.study.timings)."""
    names = list(dict.fromkeys([*train_dirs, *select_dirs, *eval_dirs]))
    arms = [load_arm(n, _path(train_dirs.get(n)), _path(select_dirs.get(n)),
                     _path(eval_dirs.get(n))) for n in names]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ifeval = None if ifeval_dir is None else report_ifeval.load(ifeval_dir, names)
    pooled = report_pooled.compute(names, _path(ifeval_dir), eval_dirs, n_boot)
    atomic_write_json(out_dir / "pooled.json", pooled)
    figures = render_figures(arms, out_dir, ifeval)
    report = out_dir / "report.md"
    text = render_markdown(arms, figures, title, sample_steps, queries_per_step, ifeval, pooled,
                           protocol)
    timed = stage_timings.section(stage_timings.load(timings_dir)) if timings_dir else []
    report.write_text(text + ("\n" + "\n".join(timed).rstrip() + "\n" if timed else ""))
    return report


# ---- CLI -------------------------------------------------------------------------------------
def _named(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected ARM=PATH, got {value!r}")
    return name, Path(path)


def discover(root: Path) -> tuple[dict, dict, dict]:
    """Runs under `<root>/train/<run>`, `<root>/select/<run>`, `<root>/evaluate/<run>`; a run
    with IFEval results only (`<root>/ifeval/<run>`, the bases `base-<seed>` aside) is taken
    too, with its (missing) evaluation folder."""
    found = []
    for stage in ("train", "select", "evaluate", "ifeval"):
        folder = root / stage
        found.append({p.name: p for p in sorted(folder.iterdir()) if p.is_dir()}
                     if folder.is_dir() else {})
    train, select, evals, ifeval = found
    known = {*train, *select, *evals}
    extra = [n for n in ifeval if n not in known and split_run(n)[0] != "base"]
    return train, select, evals | {n: root / "evaluate" / n for n in extra}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lsp.report", description=__doc__.splitlines()[0])
    for flag, what in (("--train-dir", "training run folder"), ("--select-dir", "selection "
                       "folder (or selection.json)"), ("--eval-dir", "evaluation folder (or "
                       "details.json)")):
        p.add_argument(flag, type=_named, action="append", default=[], metavar="ARM=PATH",
                       help=f"an arm's {what}; repeat per arm")
    p.add_argument("--root", type=Path,
                   help="also take every arm found under ROOT/{train,select,evaluate}")
    p.add_argument("--ifeval-dir", type=Path,
                   help="IFEval results (<dir>/<name>/details.json; default ROOT/ifeval)")
    p.add_argument("--out", type=Path, default=Path("artifacts/report"), help="output folder")
    p.add_argument("--protocol", type=Path, default=Path("docs/protocol.md"),
                   help="the study protocol whose primary endpoint the report quotes")
    p.add_argument("--n-boot", type=int, default=report_pooled.P.N_BOOT,
                   help="bootstrap replicates of the pooled 95%% CIs")
    p.add_argument("--title", default=TITLE)
    p.add_argument("--sample-steps", type=int, default=3, help="steps shown per arm")
    p.add_argument("--queries-per-step", type=int, default=3)
    return p.parse_args(argv)


@exit_on_input_error
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.root and not args.root.is_dir():
        raise FileNotFoundError(2, "no such study folder (--root)", str(args.root))
    train, select, evals = discover(args.root) if args.root else ({}, {}, {})
    train |= dict(args.train_dir)
    select |= dict(args.select_dir)
    evals |= dict(args.eval_dir)
    ifeval = args.ifeval_dir or (args.root / "ifeval" if args.root else None)
    path = build_report(train, select, evals, args.out, args.title, args.sample_steps,
                        args.queries_per_step, ifeval, args.protocol, args.n_boot,
                        args.root / "timings" if args.root else None)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
