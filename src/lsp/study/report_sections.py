"""The study report's Markdown sections (results, judge sanity, training, checkpoint selection,
Challenger queries), each a list of lines built from the loaded `Arm`s (`lsp.study.report`).

An arm's inputs may be missing: each section says what it lacks instead of failing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from lsp.evaluation.outputs import SUBSETS
from lsp.evaluation.sanity import pct
from lsp.study.markdown import fenced, table

if TYPE_CHECKING:  # only for annotations: lsp.study.report imports this module
    from lsp.study.report import Arm

QUERY_CHARS = 600  # longer queries are cut in the report (the full text is in samples.jsonl)
WEAK_JUDGE_MODELS = ("embedded:", "smollm", "tiny:")  # the offline judges environment.md measured
MIN_MISMATCH_AGREEMENT = 0.75  # same bar as lsp.evaluation.sanity.format_sanity's warning


# ---- formatting ------------------------------------------------------------------------------
def _f(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pm(rate, se) -> str:
    if rate is None:
        return "n/a"
    return f"{rate:.1f}" if se is None else f"{rate:.1f} ± {se:.1f}"


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
        f"{pct(known.get('agreement'))} (n={known.get('n', 0)}; longer-wins rule: "
        f"{pct(known.get('expected_longer_rate'))})" if known else "n/a",
        f"{pct(mism.get('agreement'))} (n={mism.get('n', 0)}; chance 50%)" if mism else "n/a",
        " / ".join(pct(c.get("flip_rate")) for c in (known, mism, ev)),
        f"{_f(known.get('length_corr'), '+.2f')} / {_f(ev.get('length_corr'), '+.2f')}",
        pct(ev.get("longer_preferred_rate")), sanity_verdict(m),
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
            *table(SANITY_HEADER, [sanity_row(a) for a in judged]),
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
    """Rates in % (alpaca-eval's scale) as "rate ± SE"; lengths in characters."""
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
    """One row per arm judged against `key` (`vs_<baseline>`); a column per subset any arm has."""
    judged = [a for a in arms if a.metrics and key in a.metrics]
    found = {s for a in judged for s in (a.metrics[key].get("subsets") or {})}
    subsets = [s for s in SUBSETS if s in found] + sorted(found - set(SUBSETS))
    header = ["Arm", "Selected checkpoint", "n judged", "Win rate, ties ½ (± SE)",
              "Win rate, ties = loss (± SE)", "W/T/L", *subsets,
              "Avg length, arm / baseline (chars)", "LC win rate"]
    return table(header, [result_row(a, key, subsets) for a in judged])


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
    out += table(["Arm", "Algo", "beta", "Self-reward", "lr", "Queries x answers", "Policy",
                  "Reward", "Steps logged"], [arm_config_row(a) for a in trained])
    with_history = [a for a in trained if a.history]
    if not with_history:
        return out + ["No `history.csv` in any training run: no curves.", ""]
    out += ["Start → end of training (mean of the first and last tenth of the logged steps):", ""]
    rows = [[f"`{k}`", *(start_end(a.history, k) for a in with_history)] for k in SUMMARY_METRICS]
    out += table(["Metric", *(a.name for a in with_history)],
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
    out += table(["Arm", "Score per checkpoint step", "Chosen"], rows)
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
    return [" · ".join(parts), "", *fenced(str(q.get("query") or ""), QUERY_CHARS)]


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
