"""`python -m lsp.report`: the study report, Markdown with PNG plots, the pipeline's last stage.

Reads, per arm (lsp, lsp_zero, grpo, ...), what the earlier stages wrote: the training run folder
(`history.csv`, `samples.jsonl`, `config.yaml`), the checkpoint selection (`selection.json`) and the
evaluation (`details.json`). Any of them may be missing (eval not run, no GRPO arm): the report
is still written and says what is missing. Writes `<out>/report.md`, `training_curves.png`,
`win_rates.png`, `selection.png`. Example:
    python -m lsp.report --train-dir lsp=artifacts/train/lsp --select-dir lsp=artifacts/select/lsp \
        --eval-dir lsp=artifacts/evaluate/lsp --out artifacts/report
    python -m lsp.report --root artifacts --out artifacts/report   # every arm found under root
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lsp.errors import exit_on_input_error
from lsp.io import read_jsonl
from lsp.selfplay.callbacks import read_history
from lsp.study import report_ifeval
from lsp.study.plots import (
    SUBSETS,
    arm_colors,
    plot_selection,
    plot_training_curves,
    plot_win_rates,
)

TITLE = "Language Self-Play study report"
QUERY_CHARS = 600  # longer queries are cut in the report (the full text is in samples.jsonl)
WEAK_JUDGE_MODELS = ("embedded:", "smollm", "tiny:")  # the offline judges environment.md measured
MIN_MISMATCH_AGREEMENT = 0.75  # same bar as lsp.evaluation.sanity.format_sanity's warning
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control bytes but \t and \n


@dataclass
class Arm:
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


# ---- formatting ------------------------------------------------------------------------------
def _f(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x) -> str:
    """A fraction as a percentage."""
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _pm(rate, se) -> str:
    if rate is None:
        return "n/a"
    return f"{rate:.1f}" if se is None else f"{rate:.1f} ± {se:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in cells), ""]


def _fenced(text: str) -> list[str]:
    """A code fence longer than any backtick run inside: model text may contain ``` itself."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    text = CONTROL.sub("\ufffd", text)  # a model's stray control bytes would garble the page
    cut = text if len(text) <= QUERY_CHARS else text[:QUERY_CHARS] + " [...]"
    return [fence + "text", cut, fence, ""]


# ---- judge and its sanity --------------------------------------------------------------------
def baselines(arms: list[Arm]) -> list[str]:
    """`vs_<baseline>` blocks found in any details.json: base (the paper's protocol) first."""
    found = {k for a in arms if a.metrics for k, v in a.metrics.items()
             if k.startswith("vs_") and isinstance(v, dict)}
    return sorted(found, key=lambda k: (k != "vs_base", k))


def judge_is_weak(judge: dict | None) -> bool:
    model = str((judge or {}).get("model") or "").lower()
    return (judge or {}).get("kind") == "local_hf" and any(w in model for w in WEAK_JUDGE_MODELS)


def judge_name(judge: dict | None) -> str:
    if not judge:
        return "unknown judge"
    model = judge.get("model")
    return f"{judge.get('annotator', '?')} ({model})" if model else str(judge.get("annotator", "?"))


def sanity_verdict(metrics: dict) -> str:
    sanity = metrics.get("sanity") or {}
    mism = sanity.get("matched_vs_mismatched") or {}
    problems = ["weak embedded judge"] if judge_is_weak(metrics.get("judge")) else []
    if mism and (mism.get("agreement_ties_half") or 0.0) < MIN_MISMATCH_AGREEMENT:
        problems.append("fails the length-independent check")
    if problems:
        return f"**{'; '.join(problems)}: not evidence of quality**"
    return "passes the sanity checks" if mism else "unchecked (no sanity report)"


def judge_warnings(arms: list[Arm]) -> list[str]:
    judged = [a for a in arms if a.metrics]
    weak = sorted({judge_name(a.metrics.get("judge")) for a in judged
                   if judge_is_weak(a.metrics.get("judge"))})
    failing = [a.name for a in judged if "fails" in sanity_verdict(a.metrics)]
    unchecked = [a.name for a in judged if not a.metrics.get("sanity")]
    out = []
    if weak:
        out.append(
            f"> **Warning: judged by the weak embedded model {', '.join(weak)}.** Offline numbers "
            "judged by a small embedded model are not evidence of quality "
            "(`../shared/docs/environment.md`: SmolLM2-135M as a judge agreed with the "
            "strong-judge preference on 30% of pairs, picked the right answer in a "
            "length-independent check 55% of the time, and swapping the order flipped 93% of "
            "its verdicts). They show that the pipeline runs end to end; evidence needs a strong "
            "judge (`eval/judge=openai_compatible` or `eval/judge=alpaca_eval_gpt4_turbo`).")
    if failing:
        out.append(f"> **Warning:** the judge used for {', '.join(failing)} fails the "
                   "length-independent sanity check (matched vs mismatched answer): its win "
                   "rates are not evidence.")
    if unchecked:
        out.append(f"> Note: no judge sanity report for {', '.join(unchecked)} "
                   "(`eval.sanity.enabled=false`): those win rates are unqualified.")
    return [line for w in out for line in (w, "")]


def sanity_row(arm: Arm) -> list[str]:
    m = arm.metrics
    s = m.get("sanity") or {}
    known, mism, ev = (s.get(k) or {} for k in
                       ("known_preference", "matched_vs_mismatched", "evaluation_pairs"))
    return [
        arm.name, judge_name(m.get("judge")),
        f"{_pct(known.get('agreement'))} (n={known.get('n', 0)}; longer-wins rule: "
        f"{_pct(known.get('expected_longer_rate'))})" if known else "n/a",
        f"{_pct(mism.get('agreement'))} (n={mism.get('n', 0)}; chance 50%)" if mism else "n/a",
        " / ".join(_pct(c.get("flip_rate")) for c in (known, mism, ev)),
        f"{_f(known.get('length_corr'), '+.2f')} / {_f(ev.get('length_corr'), '+.2f')}",
        _pct(ev.get("longer_preferred_rate")), sanity_verdict(m),
    ]


SANITY_HEADER = [
    "Arm", "Judge", "Agreement with strong-judge preference", "Length-independent check",
    "Order-flip rate (known / mismatched / eval pairs)", "Length corr (known / eval pairs)",
    "Longer output wins (eval pairs)", "Verdict",
]


def sanity_section(arms: list[Arm]) -> list[str]:
    judged = [a for a in arms if a.metrics]
    if not judged:
        return []
    return ["**Judge sanity** (qualifies the win rates above; from `details.json` `sanity`):", "",
            *_table(SANITY_HEADER, [sanity_row(a) for a in judged]),
            "Agreement with the strong-judge preference: AlpacaEval 2.0 reference vs 1.0 "
            "reference, which is also the longer one in most pairs (see the longer-wins rule). "
            "Length-independent check: an instruction's own answer vs the answer to another "
            "instruction of similar length (chance 50%). Order flips: how often swapping the two "
            "outputs changes the verdict (pure position bias: 100%). Length corr: correlation of "
            "the verdict with the length difference (+1: the longer output always wins).", ""]


# ---- results ---------------------------------------------------------------------------------
def evaluated_step(arm: Arm) -> int | None:
    """The checkpoint step the evaluation used (its candidate path), else the selection's choice."""
    model = ((arm.metrics or {}).get("candidate") or {}).get("model")
    found = re.search(r"step_(\d+)", str(model or ""))
    if found:
        return int(found.group(1))
    return ((arm.selection or {}).get("chosen") or {}).get("step")


def selected_checkpoint(arm: Arm) -> str:
    chosen = (arm.selection or {}).get("chosen") or {}
    step = evaluated_step(arm)
    if "step" not in chosen:
        return "n/a" if step is None else f"step {step}"
    text = f"step {chosen['step']} (score {_f(chosen.get('score'), '.3f')})"
    # An evaluation of another checkpoint than the selection chose is worth seeing.
    return text if step in (None, chosen["step"]) else f"{text}; **evaluated step {step}**"


def result_row(arm: Arm, key: str, subsets: list[str]) -> list[str]:
    block = arm.metrics.get(key) or {}
    o, subs = block.get("overall") or {}, block.get("subsets") or {}
    lc = block.get("length_controlled") or {}
    return [
        arm.name, selected_checkpoint(arm), str(o.get("n_total", "n/a")),
        _pm(o.get("win_rate"), o.get("standard_error")),
        _pm(o.get("win_rate_ties_as_loss"), o.get("standard_error_ties_as_loss")),
        f"{o.get('n_wins', '?')}/{o.get('n_ties', '?')}/{o.get('n_losses', '?')}",
        *(_pm((subs.get(s) or {}).get("win_rate"), (subs.get(s) or {}).get("standard_error"))
          for s in subsets),
        f"{_f(o.get('avg_length'), '.0f')} / {_f(o.get('baseline_avg_length'), '.0f')}",
        _pm(lc.get("length_controlled_winrate"), lc.get("lc_standard_error"))
        if lc.get("available") else "unavailable",
    ]


def results_table(arms: list[Arm], key: str) -> list[str]:
    judged = [a for a in arms if a.metrics and key in a.metrics]
    found = {s for a in judged for s in (a.metrics[key].get("subsets") or {})}
    subsets = [s for s in SUBSETS if s in found] + sorted(found - set(SUBSETS))
    header = ["Arm", "Selected checkpoint", "n judged", "Win rate, ties ½ (± SE)",
              "Win rate, ties = loss (± SE)", "W/T/L", *subsets,
              "Avg length, arm / baseline (chars)", "LC win rate"]
    return _table(header, [result_row(a, key, subsets) for a in judged])


def lc_notes(arms: list[Arm], key: str) -> list[str]:
    reasons = {(a.metrics.get(key) or {}).get("length_controlled", {}).get("reason")
               for a in arms if a.metrics and key in a.metrics}
    reasons = sorted(r for r in reasons if r)
    return [f"Length-controlled win rate unavailable: {r[:160]}" for r in reasons]


def results_section(arms: list[Arm], win_png: Path | None) -> list[str]:
    out = ["## Results: AlpacaEval win rates", ""]
    missing = [a.name for a in arms if not a.metrics]
    if missing:
        out += [f"No evaluation (`details.json`) for: {', '.join(missing)}.", ""]
    if len(missing) == len(arms):
        return out
    out += judge_warnings(arms)
    for key in baselines(arms):
        out += [f"Against the `{key[3:]}` outputs (candidate = output_2; a tie is half a win "
                "in alpaca-eval's rate, a non-win in the paper's reading; subsets: ties ½):", ""]
        out += results_table(arms, key)
        out += [f"- {n}" for n in lc_notes(arms, key)] + [""]
    out += sanity_section(arms)
    if win_png:
        out += [f"![Win rates per subset]({win_png.name})", ""]
    return out


# ---- training --------------------------------------------------------------------------------
SUMMARY_METRICS = (
    "solver/reward_mean", "challenger/reward_mean", "self_reward/mean", "kl/solver",
    "kl/challenger", "rollout/query_len_mean", "rollout/answer_len_mean",
    "rollout/invalid_queries", "rollout/frac_zero_std_groups", "degeneration/distinct_2",
    "judge/parse_failures", "perf/step_s", "perf/tokens_per_s",
)


def start_end(history: list[dict], key: str) -> str:
    """Mean of the first and of the last tenth of the logged steps (at least one step each)."""
    vals = [r[key] for r in history if r.get(key) is not None]
    if not vals:
        return "-"
    k = max(len(vals) // 10, 1)
    first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
    return f"{first:.3g} → {last:.3g}"


def arm_config_row(arm: Arm) -> list[str]:
    c = arm.config or {}
    algo, roll, optim = c.get("algo") or {}, c.get("rollout") or {}, c.get("optim") or {}
    self_reward = (algo.get("self_reward") or {}).get("enabled")
    steps = [int(r["step"]) for r in arm.history]
    return [arm.name, str(algo.get("name", "?")), str(algo.get("beta", "?")),
            {True: "yes", False: "no"}.get(self_reward, "?"), str(optim.get("lr", "?")),
            f"{roll.get('num_queries', '?')} x {roll.get('group_size', '?')}",
            str((c.get("model") or {}).get("policy", "?")),
            str((c.get("reward") or {}).get("_target_", "?")).rsplit(".", 1)[-1],
            f"{len(steps)} (last {max(steps)})" if steps else "0"]


def training_section(arms: list[Arm], curves_png: Path | None) -> list[str]:
    out = ["## Training", ""]
    trained = [a for a in arms if a.train_dir]
    if not trained:
        return out + ["No training runs given.", ""]
    out += _table(["Arm", "Algo", "beta", "Self-reward", "lr", "Queries x answers", "Policy",
                   "Reward", "Steps logged"], [arm_config_row(a) for a in trained])
    with_history = [a for a in trained if a.history]
    if not with_history:
        return out + ["No `history.csv` in any training run: no curves.", ""]
    out += ["Start → end of training (mean of the first and last tenth of the logged steps):", ""]
    rows = [[f"`{k}`", *(start_end(a.history, k) for a in with_history)] for k in SUMMARY_METRICS]
    out += _table(["Metric", *(a.name for a in with_history)],
                  [r for r in rows if any(c != "-" for c in r[1:])])
    if curves_png:
        out += [f"![Training curves]({curves_png.name})", ""]
    return out


def selection_section(arms: list[Arm], sel_png: Path | None) -> list[str]:
    out = ["## Checkpoint selection", ""]
    chosen = [a for a in arms if a.selection]
    if not chosen:
        return out + ["No `selection.json` for any arm.", ""]
    crit = chosen[0].selection.get("criterion", "?")
    prompts = chosen[0].selection.get("validation_prompts") or {}
    out += [f"Criterion: {crit} ({prompts.get('name', 'validation prompts')}, "
            f"n={prompts.get('n', '?')}; never AlpacaEval instructions).", ""]
    rows = [[a.name, ", ".join(f"{c['step']}: {_f(c.get('score'), '.3f')}"
                               for c in sorted(a.selection.get("candidates", []),
                                               key=lambda c: c["step"])),
             selected_checkpoint(a)] for a in chosen]
    out += _table(["Arm", "Score per checkpoint step", "Chosen"], rows)
    if sel_png:
        out += [f"![Checkpoint selection]({sel_png.name})", ""]
    return out


# ---- challenger queries over training --------------------------------------------------------
def pick_steps(samples: list[dict], k: int) -> list[int]:
    """k logged steps spread evenly from the first to the last (the paper's Boxes 4-5 show
    queries at a few iterations)."""
    steps = sorted({int(r["step"]) for r in samples if r.get("step") is not None})
    if len(steps) <= k:
        return steps
    return [steps[i] for i in sorted({round(j * (len(steps) - 1) / (k - 1)) for j in range(k)})]


def step_queries(samples: list[dict], step: int) -> list[dict]:
    """One entry per query of a step (sample rows repeat it once per answer)."""
    queries: dict = {}
    for r in samples:
        if r.get("step") != step:
            continue
        q = queries.setdefault(r.get("query_id"), {**r, "rewards": [], "self_rewards": []})
        if r.get("reward") is not None:
            q["rewards"].append(r["reward"])
        if r.get("self_reward") is not None:
            q["self_rewards"].append(r["self_reward"])
    return list(queries.values())


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def query_block(q: dict) -> list[str]:
    parts = [f"**Query {q.get('query_id', '?')}**",
             f"challenger reward {_f(q.get('challenger_reward'))}"]
    if q["rewards"]:
        parts.append(f"solver reward {_f(_mean(q['rewards']))} (mean of {len(q['rewards'])})")
    if q["self_rewards"]:
        parts.append(f"self-reward {_f(_mean(q['self_rewards']))}")
    if q.get("valid") is False:
        parts.append(f"invalid ({q.get('invalid_reason') or '?'}): not answered")
    return [" · ".join(parts), "", *_fenced(str(q.get("query") or ""))]


def arm_queries(arm: Arm, n_steps: int, per_step: int) -> list[str]:
    out = [f"### {arm.name}", ""]
    if not arm.samples:
        return out + ["No `samples.jsonl` (or it is empty).", ""]
    for step in pick_steps(arm.samples, n_steps):
        queries = step_queries(arm.samples, step)
        invalid = sum(q.get("valid") is False for q in queries)
        out += [f"#### Step {step} ({min(per_step, len(queries))} of {len(queries)} queries "
                f"logged, {invalid} invalid)", ""]
        for q in queries[:per_step]:
            out += query_block(q)
    return out


def queries_section(arms: list[Arm], n_steps: int, per_step: int) -> list[str]:
    out = ["## How the Challenger's queries change over training", "",
           "Queries logged by the sample table (`samples.jsonl`) at the first, a middle and the "
           f"last logged step (cut at {QUERY_CHARS} characters). Challenger reward: minus the mean "
           "Solver reward on the query (plus the self-reward for LSP).", ""]
    trained = [a for a in arms if a.train_dir]
    if not trained:
        return out + ["No training runs given.", ""]
    no_challenger = [a.name for a in trained if not has_challenger(a)]
    if no_challenger:
        out += [f"No Challenger in {', '.join(no_challenger)} (GRPO: queries from the prompt "
                "file), so no queries shown for them.", ""]
    for arm in trained:
        if has_challenger(arm):
            out += arm_queries(arm, n_steps, per_step)
    return out


def has_challenger(arm: Arm) -> bool:
    return ((arm.config or {}).get("algo") or {}).get("name") != "grpo"


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
        *_table(["Arm", "Training curves", "Sample table", "Selection", "Evaluation"], rows),
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
                    n_steps: int = 3, per_step: int = 3, ifeval: dict | None = None) -> str:
    lines = [f"# {title}", "", f"Arms: {', '.join(a.name for a in arms) or 'none'}.", ""]
    lines += missing_section(arms)
    if ifeval is not None:
        lines += report_ifeval.section(ifeval, [a.name for a in arms], figures.get("ifeval_types"))
    lines += results_section(arms, figures.get("win_rates"))
    lines += training_section(arms, figures.get("curves"))
    lines += queries_section(arms, n_steps, per_step)
    lines += selection_section(arms, figures.get("selection"))
    lines += provenance_section(arms, figures)
    return "\n".join(lines).rstrip() + "\n"


def _path(p) -> Path | None:
    return Path(p) if p else None


def build_report(train_dirs: dict[str, Path], select_dirs: dict[str, Path],
                 eval_dirs: dict[str, Path], out_dir: Path, title: str = TITLE,
                 sample_steps: int = 3, queries_per_step: int = 3,
                 ifeval_dir: Path | None = None) -> Path:
    """Writes `out_dir/report.md` and its PNGs; returns the Markdown's path. Arms are the union
    of the three mappings' keys, in that order; any input may be missing. `ifeval_dir` holds
    `<name>/details.json` for the base and the arms (the IFEval section)."""
    names = list(dict.fromkeys([*train_dirs, *select_dirs, *eval_dirs]))
    arms = [load_arm(n, _path(train_dirs.get(n)), _path(select_dirs.get(n)),
                     _path(eval_dirs.get(n))) for n in names]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ifeval = None if ifeval_dir is None else report_ifeval.load(ifeval_dir, names)
    figures = render_figures(arms, out_dir, ifeval)
    report = out_dir / "report.md"
    report.write_text(render_markdown(arms, figures, title, sample_steps, queries_per_step,
                                      ifeval))
    return report


# ---- CLI -------------------------------------------------------------------------------------
def _named(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected ARM=PATH, got {value!r}")
    return name, Path(path)


def discover(root: Path) -> tuple[dict, dict, dict]:
    """Arms under `<root>/train/<arm>`, `<root>/select/<arm>`, `<root>/evaluate/<arm>`."""
    found = []
    for stage in ("train", "select", "evaluate"):
        folder = root / stage
        found.append({p.name: p for p in sorted(folder.iterdir()) if p.is_dir()}
                     if folder.is_dir() else {})
    return found[0], found[1], found[2]


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
                        args.queries_per_step, ifeval)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
