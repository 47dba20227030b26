"""The report's per-seed and pooled sections on a small study written to disk as the stages write
it: runs `<arm>-<seed>` and bases `base-<seed>`, IFEval per-prompt records and details
(lsp.evaluation.ifeval), AlpacaEval annotations, training histories (the trainer's own
MetricsHistory callback). Values hand-computed in the comments."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from lsp import headline
from lsp.evaluation import ifeval as ife
from lsp.evaluation.scoring import winrate_block
from lsp.selfplay.callbacks import MetricsHistory
from lsp.study.report import build_report, main

SEEN, HELD = "punctuation:no_comma", "keywords:letter_frequency"
T, F = True, False
# key -> (strict, loose) per model; keys 1-3 carry a seen type, key 4 a held-out one
IFEVAL = {
    "base-0": [(F, F), (F, T), (T, T), (F, F)],
    "lsp-0": [(T, T), (F, T), (T, T), (F, T)],
    "base-1": [(T, T), (F, F), (F, F), (F, F)],
    "lsp-1": [(T, T), (F, F), (F, F), (F, F)],
}
IFEVAL["grpo-0"], IFEVAL["grpo-1"] = IFEVAL["base-0"], IFEVAL["base-1"]  # no change at all
# lsp-0 vs base-0: seen strict run [1,0,1] base [0,0,1] +33.3; seen loose [1,1,1] vs [0,1,1] +33.3;
#   held-out loose 1 vs 0 +100; all strict [1,0,1,0] vs [0,0,1,0] +25; all loose +50
# lsp-1 vs base-1: 0 everywhere. Pooled seen loose: (33.3 + 0) / 2 = 16.7, SD 23.6
PREFS = {"lsp-0": [2.0, 2.0, 1.0, 1.5], "lsp-1": [2.0, 1.0, 1.0, 1.0]}  # 62.5 %, 25 % -> 43.75
SUBSET = ["koala", "koala", "oasst", "oasst"]


def records(name: str) -> list[dict]:
    return [{"key": k, "prompt": f"prompt {k}", "response": f"{name} answer {k}",
             "instruction_id_list": [HELD if k == 4 else SEEN], "strict": [s], "loose": [lo],
             "truncated": False} for k, (s, lo) in enumerate(IFEVAL[name], start=1)]


def write_ifeval(root: Path, name: str) -> None:
    """records.jsonl and details.json as lsp.evaluation.ifeval_run.write_metrics writes them."""
    folder = root / "ifeval" / name
    folder.mkdir(parents=True)
    rec = records(name)
    ife.write_records(folder / "records.jsonl", rec)
    base = None if name.startswith("base") else records(f"base-{name[-1]}")
    details = {"model": name, **ife.model_report(rec, {})}
    if base is not None:
        details["vs_base"] = {m: ife.paired_difference(rec, base, m, 200, 0)
                              for m in ("strict", "loose")}
    details["splits"] = ife.split_report(rec, [HELD], base, 200, 0)
    (folder / "details.json").write_text(json.dumps(details))


def write_alpaca(root: Path, name: str) -> None:
    """vs_base/annotations.json as alpaca-eval writes it, details.json as lsp.evaluate does."""
    rows = [{"instruction": f"q{i}", "output_1": "base", "output_2": name, "dataset": s,
             "generator_1": f"base-{name[-1]}", "generator_2": name, "preference": p}
            for i, (s, p) in enumerate(zip(SUBSET, PREFS[name], strict=True))]
    folder = root / "evaluate" / name
    (folder / "vs_base").mkdir(parents=True)
    (folder / "vs_base" / "annotations.json").write_text(json.dumps(rows))
    df = pd.DataFrame(rows)
    details = {"judge": {"kind": "alpaca_eval", "annotator": "test"},
               "vs_base": {"overall": winrate_block(df), "subsets": {},
                           "length_controlled": {"available": False, "reason": "test"}}}
    (folder / "details.json").write_text(json.dumps(details))


SIGNAL = {  # per run: within-group stds logged every step (lsp.selfplay.metrics)
    "lsp-0": {"solver/reward_group_std": 0.2, "reward/judge_group_std": 0.5,
              "reward/constraints_group_std": 0.1, "self_reward/group_std": 0.03,
              "solver/total_reward_group_std": 0.22, "self_reward/std": 0.08},
    "lsp-1": {"solver/reward_group_std": 0.4, "reward/judge_group_std": 0.7,
              "reward/constraints_group_std": 0.3, "self_reward/group_std": 0.05,
              "solver/total_reward_group_std": 0.42, "self_reward/std": 0.08},
    "grpo-0": {"solver/reward_group_std": 0.3, "reward/judge_group_std": 0.6,
               "reward/constraints_group_std": 0.2},
}


def write_train(root: Path, name: str) -> None:
    folder = root / "train" / name
    folder.mkdir(parents=True)
    cb = MetricsHistory(path=str(folder / "history.csv"))
    for step in (1, 2):
        # step 2 logs 1.5x step 1's spread: the mean over training is 1.25x the table above
        metrics = {k: v * (1.0 if step == 1 else 1.5) for k, v in SIGNAL[name].items()}
        cb.on_train_batch_end(SimpleNamespace(global_step=step, is_global_zero=True),
                              SimpleNamespace(last_metrics=metrics), None, None, 0)
    sr = "  self_reward:\n    enabled: true\n    weight: 1.0\n" if name.startswith("lsp") else ""
    (folder / "config.yaml").write_text(
        f"algo:\n  name: {name.split('-')[0]}\n{sr}reward:\n  components:\n"
        "    judge:\n      weight: 0.1\n    constraints:\n      weight: 1.0\n")


PROTOCOL = """# Study protocol

## Arms
lsp, lsp_zero, grpo; seeds 0, 1, 2.

## Primary endpoint
IFEval prompt-level loose accuracy on **seen-type** prompts, pooled over seeds.

- alpha = 0.05, two-sided.

### Test
Two-level bootstrap.

## Minimum detectable effect
1.5 points.
"""


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "artifacts"
    for name in IFEVAL:
        write_ifeval(root, name)
    for name in PREFS:
        write_alpaca(root, name)
    for name in SIGNAL:
        write_train(root, name)
    (tmp_path / "protocol.md").write_text(PROTOCOL)
    return root


def rows_of(md: str) -> dict[str, list[str]]:
    """First cell -> the row's cells, for every Markdown table row (the first row of a name)."""
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in md.splitlines() if line.startswith("|")]
    return {r[0]: r for r in reversed(rows)}


def report(study: Path, out: Path, **kw) -> str:
    names = ["lsp-0", "lsp-1", "grpo-0", "grpo-1"]
    return build_report({n: study / "train" / n for n in names if n in SIGNAL}, {},
                        {n: study / "evaluate" / n for n in names}, out,
                        ifeval_dir=study / "ifeval", n_boot=2000, **kw).read_text()


def section(md: str, title: str) -> str:
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def test_per_seed_and_pooled_rows(study, tmp_path):
    md = report(study, tmp_path / "out", protocol=tmp_path / "protocol.md")
    pooled = section(md, "## Pooled over seeds")
    ifeval = pooled[pooled.index("**IFEval"):pooled.index("**AlpacaEval")]
    rows = rows_of(ifeval)
    # columns: all strict, all loose, seen strict, seen loose, held-out strict, held-out loose
    assert rows["lsp-0"][2:] == ["+25.0", "+50.0", "+33.3", "+33.3", "+0.0", "+100.0"]
    assert rows["lsp-1"][2:] == ["+0.0"] * 6
    lsp = rows["**lsp** pooled"]
    assert lsp[1] == "2" and lsp[5].startswith("+16.7 [") and lsp[5].endswith("], SD 23.6")
    # grpo equals the base on every prompt of every seed: no spread at either level
    assert rows["**grpo** pooled"][2] == "+0.0 [+0.0, +0.0], SD 0.0"
    alpaca = rows_of(pooled[pooled.index("**AlpacaEval"):pooled.index("**The base")])
    # overall, koala, oasst: lsp-0 scores [1, 1 | 0, 0.5], lsp-1 [1, 0 | 0, 0]
    assert alpaca["lsp-0"][2:] == ["62.5", "100.0", "25.0"]
    assert alpaca["lsp-1"][2:] == ["25.0", "50.0", "0.0"]
    assert alpaca["**lsp** pooled"][2].startswith("43.8 [")
    assert alpaca["**grpo** pooled"][1:3] == ["0", "-"]  # no annotations for grpo
    # the base in the card form: base-0 prompt strict 1/4, instruction strict 1/4 -> 25.0
    card = rows_of(pooled[pooled.index("**The base"):])
    assert card["base-0"][1] == "25.0" and card["base-1"][1] == "25.0"
    # a level, not a difference: the prompts' resampling still spreads it (4 prompts a seed)
    base = card["**base** pooled (2 seeds)"][1]
    assert base.startswith("25.0 [") and base.endswith("], SD 0.0") and base != "25.0 [25.0, 25.0]"
    assert card["SmolLM2-135M-Instruct model card (lighteval)"][1] == "29.9"
    assert card["Gap: pooled base minus the card"][1] == "-4.9"  # 25.0 - 29.9


def test_primary_endpoint_quoted_and_reported(study, tmp_path):
    md = report(study, tmp_path / "out", protocol=tmp_path / "protocol.md")
    quoted = section(md, "## Protocol: the primary endpoint")
    # the "Primary endpoint" section verbatim, its subsection included, the next section not
    assert "> ## Primary endpoint\n> IFEval prompt-level loose accuracy on **seen-type** " in quoted
    assert "> - alpha = 0.05, two-sided." in quoted and "> ### Test" in quoted
    assert "Minimum detectable effect" not in quoted and "## Arms" not in quoted
    pooled = section(md, "## Pooled over seeds")
    line = next(x for x in pooled.splitlines() if x.startswith("- **lsp**:"))
    assert line.startswith("- **lsp**: +16.7 points, 95% CI [") and "seed SD 23.6, 2 seed(s)" in line
    assert "- **grpo** (control): +0.0 points, 95% CI [+0.0, +0.0]" in pooled


def test_protocol_missing_or_without_an_endpoint(study, tmp_path):
    md = report(study, tmp_path / "a", protocol=tmp_path / "nope.md")
    assert "**The protocol is missing**" in md
    # docs/protocol.md's form: a bold-labelled list item under "## Endpoints"; a mere mention of
    # the primary endpoint elsewhere is not quoted
    (tmp_path / "inline.md").write_text(
        "# Protocol\n\nThe report quotes the primary endpoint.\n\n## Endpoints\n"
        "- **Primary endpoint.** Seen loose,\n  pooled over seeds.\n  - the lsp arms.\n"
        "- **Estimate.** The mean.\n\nOther text.\n")
    md = report(study, tmp_path / "b", protocol=tmp_path / "inline.md")
    quoted = section(md, "## Protocol: the primary endpoint")
    assert ("> - **Primary endpoint.** Seen loose,\n>   pooled over seeds.\n>   - the lsp arms.\n"
            in quoted)
    assert "Estimate" not in quoted and "quotes the primary" not in quoted
    (tmp_path / "none.md").write_text("# Protocol\n\nNo endpoint yet.\n")
    md = report(study, tmp_path / "c", protocol=tmp_path / "none.md")
    assert "names no primary endpoint" in md


def test_which_signal_drives_training(study, tmp_path):
    md = report(study, tmp_path / "out")
    signal = md[md.index("### Which signal drives training"):]
    header = next(line for line in signal.splitlines() if line.startswith("| Arm"))
    assert [c.strip() for c in header.split("|")[1:-1]] == [
        "Arm", "runs", "weights", "R (the reward)", "constraints (part of R)", "judge (part of R)",
        "R_Q (self-reward)", "R + w R_Q (the Solver's advantage)", "R_Q, overall std"]
    rows = rows_of(signal)
    # lsp: mean over steps = 1.25 x, then over its 2 runs: R (0.2 + 0.4) / 2 x 1.25 = 0.375
    assert rows["lsp"][1:] == ["2", "judge 0.1, constraints 1.0, R_Q 1.0", "0.375", "0.250",
                               "0.750", "0.050", "0.400", "0.100"]
    assert rows["grpo"][1:] == ["1", "judge 0.1, constraints 1.0", "0.375", "0.250", "0.750",
                                "-", "-", "-"]


def test_pooled_json_and_the_headline_figures(study, tmp_path):
    report(study, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "pooled.json").read_text())
    seen = stats["arms"]["lsp"]["ifeval"]["seen"]["prompt_loose"]
    assert seen["per_seed"] == {"0": pytest.approx(100 / 3), "1": 0.0}
    lo, hi = seen["ci95"]
    alpaca = stats["arms"]["lsp"]["alpaca"]["overall"]
    assert headline.pooled_figures(stats["arms"]["lsp"]) == {
        "seen": 16.7, "lo": round(lo, 1), "hi": round(hi, 1), "sd": 23.6, "win_rate": 43.8}
    # all: strict (25 + 0) / 2, loose (50 + 0) / 2; held out loose (100 + 0) / 2
    assert headline.pooled_extra(stats["arms"]["lsp"]) == {
        "all_strict": 12.5, "all_loose": 25.0, "held_out_loose": 50.0,
        "win_ci_low": round(alpaca["ci95"][0], 1), "win_ci_high": round(alpaca["ci95"][1], 1),
        "n_seeds": 2}
    card = stats["base"]["card"]
    assert headline.card_figures(card) == {
        "card": 25.0, "lo": round(card["ci95"][0], 1), "hi": round(card["ci95"][1], 1), "sd": 0.0}


def test_cli_finds_the_runs_and_their_bases_under_root(study, tmp_path):
    md = main(["--root", str(study), "--out", str(tmp_path / "cli"), "--n-boot", "500",
               "--protocol", str(tmp_path / "protocol.md")]).read_text()
    # runs: trained, selected or evaluated, then those with IFEval results only (grpo-1)
    assert "Runs: grpo-0, lsp-0, lsp-1, grpo-1." in md
    rows = rows_of(md)
    assert "**lsp** pooled" in rows and "**grpo** pooled" in rows
    # the per-model IFEval table, seed by seed: each base beside its runs, Δ vs its own seed's base
    ifeval = section(md, "## Results: IFEval")
    cells = [line.split("|")[1].strip() for line in ifeval.splitlines() if line.startswith("|")]
    order = list(dict.fromkeys(c for c in cells if c in IFEVAL))  # the first table's order
    assert order == ["base-0", "grpo-0", "lsp-0", "base-1", "lsp-1", "grpo-1"]
    assert rows_of(ifeval)["lsp-0"][5].startswith("+25.0 [")  # prompt strict vs base-0


def test_the_report_stage_publishes_per_arm_metrics_and_parents(study, tmp_path, monkeypatch):
    """pipelines/report.py's publishing on a real SQLite MLflow store: metrics/pooled/<arm>.json
    and one parent run per arm, named after it, carrying `pooled/<figure>`."""
    import importlib.util

    from mlflow import MlflowClient

    spec = importlib.util.spec_from_file_location(
        "report_stage", Path(__file__).resolve().parents[1] / "pipelines" / "report.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    report(study, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "pooled.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = OmegaConf.create({
        "study_name": "unit", "seed": 0, "seeds": [0, 1], "model": {"policy": "tiny:causal"},
        "arms": {}, "logger": {"tracking_uri": uri, "experiment_name": "x"}})
    assert stage.runs(OmegaConf.create({"arms": {"lsp": {}, "grpo": {}}, "seeds": [0, 1]})) == [
        "lsp-0", "lsp-1", "grpo-0", "grpo-1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    stage.publish_pooled(params, stats)
    lsp = json.loads((tmp_path / "metrics" / "pooled" / "lsp.json").read_text())
    assert lsp == headline.pooled_figures(stats["arms"]["lsp"])
    assert json.loads((tmp_path / "metrics" / "pooled" / "base.json").read_text())["card"] == 25.0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lsp-study-unit")
    parents = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(parents) == {"lsp", "grpo", "base"}
    assert parents["lsp"].data.tags["lsp.arm"] == "lsp"
    metrics = parents["lsp"].data.metrics
    assert metrics["pooled/seen"] == 16.7 and metrics["pooled/held_out_loose"] == 50.0
    assert parents["base"].data.metrics["pooled/card"] == 25.0


def test_a_seed_without_its_base_records_is_not_pooled_and_named(study, tmp_path):
    (study / "ifeval" / "base-1" / "records.jsonl").unlink()
    md = report(study, tmp_path / "out")
    assert "for want of IFEval records (`records.jsonl`) of: base-1." in md
    rows = rows_of(md[md.index("**IFEval, prompt-level"):md.index("**AlpacaEval win")])
    # seed 0 alone: lsp +33.3 on seen loose, one seed (no seed SD)
    assert rows["**lsp** pooled"][1] == "1" and rows["**lsp** pooled"][5].startswith("+33.3 [")
    assert rows["**lsp** pooled"][5].endswith("SD n/a") and rows["lsp-1"][5] == "-"
