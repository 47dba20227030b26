"""The DVC study: stage commands and deps exist; the smoke study end to end from a clean copy;
a second `dvc repro` is a no-op; a changed training param re-runs training and what follows it,
not base preparation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.repo import Repo
from dvc.utils.hydra import compose_and_dump
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("overrides", [[], ["study=smoke"]])
def test_stage_commands_and_deps_point_at_existing_files(tmp_path, overrides):
    """dvc.yaml resolved against params.yaml composed as the default and the smoke study: one
    stage per arm x seed, the base per seed."""
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    compose_and_dump(tmp_path / "params.yaml", str(REPO / "conf"), None, "pipeline", "", overrides)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with Repo(str(tmp_path)) as repo:
        stages = list(repo.index.stages)
    expected = {"prepare", "prompts", "train", "select", "generate", "generate_base", "score",
                "ifeval_base", "ifeval", "report"}
    assert {s.name.split("@")[0] for s in stages} == expected
    seeds = [0, 1] if overrides else [0, 1, 2]
    runs = {f"{a}-{s}" for a in ("lsp", "lsp_zero", "grpo") for s in seeds}
    for kind in ("train", "select", "generate", "score", "ifeval"):
        assert {s.name.split("@")[1] for s in stages if s.name.startswith(kind + "@")} == runs
    for kind in ("generate_base", "ifeval_base"):
        assert {s.name for s in stages if s.name.startswith(kind + "@")} == {f"{kind}@{s}" for s in seeds}
    for stage in stages:
        script = stage.cmd.split()[1]
        assert (REPO / script).is_file(), f"{stage.name}: {script} missing"
        code = [d.def_path for d in stage.deps if d.def_path.startswith(("src/", "pipelines/", "conf/"))]
        assert script in code, f"{stage.name} does not depend on its own script"
        missing = [p for p in code if not (REPO / p).exists()]
        assert not missing, f"{stage.name}: deps missing {missing}"


def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture
def clean_copy(tmp_path):
    """The committed/working files of the repo (no artifacts, no venv) in a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp_path / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():  # the eval set paths in conf/eval are relative to ../shared
        os.symlink(shared, tmp_path.parent / "shared", target_is_directory=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@lsp", "-c", "user.name=ci", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    return tmp_path


RUNS = tuple(f"{a}-{s}" for a in ("lsp", "lsp_zero", "grpo") for s in (0, 1))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~8 min on an idle 2-core machine; far longer beside other work
def test_smoke_study_end_to_end(clean_copy):
    """The whole seed and control structure at tiny size: 3 arms (LSP, LSP-Zero, the GRPO data
    control) x 2 seeds, the base under each seed, per-seed and pooled rows in the report, the
    DVC metrics and MLflow."""
    smoke = ["study=smoke"]
    _run([str(BIN / "python"), "pipelines/compose_params.py", *smoke], clean_copy)
    first = _run([str(BIN / "dvc"), "repro"], clean_copy)
    assert {"prepare", "prompts", "report"} | {f"train@{r}" for r in RUNS} <= _ran(first)
    report = clean_copy / "artifacts/report/report.md"
    assert report.is_file() and (clean_copy / "artifacts/report/training_curves.png").is_file()
    assert all(f"| {r} " in report.read_text() for r in RUNS)
    # IFEval for the base under each seed and every run: DVC metrics, per-prompt records, the report
    assert {"ifeval_base@0", "ifeval_base@1"} | {f"ifeval@{r}" for r in RUNS} <= _ran(first)
    for name in ("base-0", "base-1", *RUNS):
        m = json.loads((clean_copy / f"metrics/ifeval/{name}.json").read_text())
        assert 0 <= m["prompt_loose"] <= 100
        assert name.startswith("base") != ({"delta", "p"} <= set(m))
        details = json.loads((clean_copy / f"artifacts/ifeval/{name}/details.json").read_text())
        assert details["n_prompts"] == 6 and round(100 * details["prompt_level_loose"], 1) == m["prompt_loose"]
        assert len(_lines(clean_copy / f"artifacts/ifeval/{name}/records.jsonl")) == 6
    assert "## Results: IFEval" in report.read_text()
    check_curated_metrics(clean_copy, RUNS)
    check_study_runs(clean_copy, RUNS, "workspace")
    check_control_arm(clean_copy)

    second = _run([str(BIN / "dvc"), "repro"], clean_copy)
    assert _ran(second) == set(), second

    # `dvc exp run -S` composes conf/ afresh with exactly its overrides (DVC's Hydra support).
    # One seed in the experiment (CI's time): the LSP run of that seed and what follows it rerun.
    sets = [a for o in [*smoke, "arms.lsp.algo.beta=0.1", "seeds=[0]"] for a in ("-S", o)]
    third = _run([str(BIN / "dvc"), "exp", "run", *sets], clean_copy)
    diff = _run([str(BIN / "dvc"), "params", "diff", "--all"], clean_copy)
    assert re.search(r"arms\.lsp\.algo\.beta\s+0\.05\s+0\.1", diff), diff
    # (prompts reads the arms: it reruns, and its unchanged outputs stop there)
    assert _ran(third) == {"prompts", "train@lsp-0", "select@lsp-0", "generate@lsp-0",
                           "score@lsp-0", "ifeval@lsp-0", "report"}, third
    exp = _run([str(BIN / "dvc"), "exp", "ls", "--name-only"], clean_copy).split()
    assert len(exp) == 1, exp
    check_study_runs(clean_copy, ("lsp-0",), exp[0])
    # the README's comparison of experiments on one figure fits a terminal
    shown = _run([str(BIN / "dvc"), "exp", "show", "--drop", ".*", "--keep",
                  r"Experiment|^algo.beta$|.*ifeval/lsp(_zero)?-0.json:prompt_strict$"], clean_copy)
    assert shown.count(":prompt_strict") == 2 and max(map(len, shown.splitlines())) <= METRICS_WIDTH, shown


def check_control_arm(root: Path) -> None:
    """The data control trains on the cleaned prompt set, with the constraint environment's
    instructions appended as for the self-play arms (the study's reward is every arm's)."""
    prompts = _lines(root / "artifacts/queries/grpo.jsonl")
    assert len(prompts) == 784  # conf/prompts/train_instructions.jsonl, none overlapping an eval set
    instructions = [json.loads(p)["instruction"] for p in prompts]
    for run in ("grpo-0", "grpo-1"):
        queries = {json.loads(r)["query"] for r in _lines(root / f"artifacts/train/{run}/samples.jsonl")}
        assert queries and all(any(q.startswith(i.rstrip() + "\n\n") for i in instructions)
                               for q in queries)
    started = OmegaConf.load(root / "artifacts/train/grpo-1/config.yaml")
    assert started.model.policy == started.model.reference == "artifacts/base/model"
    assert started.seed == 1 and started.algo.name == "grpo"


METRICS_WIDTH = 160  # "a normal terminal" (the README shows these tables)
METRICS_SHOW_WIDTH = 200  # the whole `dvc metrics show`: per-run and pooled figures


def check_curated_metrics(root: Path, arms: tuple[str, ...]) -> None:
    """The DVC metrics are the handful of curated figures (lsp.headline), and their table fits."""
    shown = _run([str(BIN / "dvc"), "metrics", "show"], root)
    lines = shown.strip().splitlines()
    header = lines[0].split()
    assert header == ["Path", "card", "delta", "hi", "kl", "lc_win_rate", "lo", "p", "prompt_loose",
                      "prompt_strict", "reward", "sd", "seen", "step", "win_rate", "win_se"], shown
    # train, select, alpaca_eval, ifeval per run; the base per seed; the pooled figures
    assert len(lines) >= 1 + 4 * len(arms) + 2
    # the per-run figures and the pooled ones share one table: wider than a 160-column terminal
    # (`dvc metrics show metrics/pooled` shows the pooled rows alone, narrow)
    assert max(map(len, lines)) <= METRICS_SHOW_WIDTH, shown
    pooled = _run([str(BIN / "dvc"), "metrics", "show", "metrics/pooled"], root).strip().splitlines()
    assert pooled[0].split() == ["Path", "card", "hi", "lo", "sd", "seen", "win_rate"], pooled
    assert len(pooled) == 1 + 4 and max(map(len, pooled)) <= METRICS_WIDTH  # 3 arms, the base
    lc = json.loads((root / f"metrics/alpaca_eval/{arms[0]}.json").read_text())["lc_win_rate"]
    assert lc == "needs the hub (offline)"  # a short reason (the hub is off here), not a traceback
    diff = _run([str(BIN / "dvc"), "metrics", "diff", "--all"], root)
    assert max(map(len, diff.splitlines())) <= METRICS_WIDTH, diff


def check_study_runs(root: Path, arms: tuple[str, ...], exp: str) -> None:
    """MLflow: the study's experiment; per model a parent run for this DVC experiment, with its
    stage runs nested under it, tagged with study, arm, DVC experiment and commit."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lsp-study-smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    for arm in arms:
        mine = [r for r in runs if r.data.tags.get("lsp.arm") == arm
                and r.data.tags["lsp.dvc_exp"] == exp]
        parents = [r for r in mine if r.data.tags.get("lsp.role") == "parent"]
        assert len(parents) == 1, (arm, exp, [r.data.tags for r in mine])
        parent = parents[0]
        children = {r.data.tags["lsp.stage"]: r for r in mine
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"train", "select", "alpaca_eval", "ifeval"}, (arm, set(children))
        for r in (parent, *children.values()):
            assert r.data.tags["lsp.study"] == "smoke" and r.data.tags["lsp.git_commit"] == commit
        assert {"train/reward", "select/step", "alpaca_eval/win_rate", "ifeval/prompt_strict"} <= set(parent.data.metrics)
    if exp == "workspace":
        for seed in (0, 1):
            base = [r for r in runs if r.data.tags.get("lsp.arm") == f"base-{seed}"
                    and r.data.tags.get("lsp.role") == "parent"]
            assert len(base) == 1
            nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == base[0].info.run_id]
            assert [r.data.tags["lsp.stage"] for r in nested] == ["ifeval"]


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()]


def _lsp_imports(path: Path) -> set[str]:
    """lsp modules a file imports anywhere (module level or inside functions), as repo paths."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "lsp" or not name.startswith("lsp."):
                continue
            base = REPO / "src" / Path(*name.split("."))
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    found.add(str(candidate.relative_to(REPO)))
    return found


def _closure(script: str) -> set[str]:
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        for dep in _lsp_imports(REPO / path) - seen:
            seen.add(dep)
            todo.append(dep)
    # a package's __init__ counts when it holds code (lsp.config's validate, lsp.engines' pool)
    return {p for p in seen if not p.endswith("__init__.py") or (REPO / p).read_text().strip()}


def test_every_stage_depends_on_the_lsp_code_it_imports(tmp_path):
    """A DVC stage reruns only when a dep changes: each must list every src/lsp module its script
    imports, directly or through other modules (a file, or a folder holding it)."""
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    compose_and_dump(tmp_path / "params.yaml", str(REPO / "conf"), None, "pipeline", "", [])
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with Repo(str(tmp_path)) as repo:
        stages = list(repo.index.stages)
    for stage in stages:
        deps = [d.def_path.rstrip("/") for d in stage.deps]
        needed = _closure(stage.cmd.split()[1])
        missing = sorted(p for p in needed
                         if not any(p == d or p.startswith(d + "/") for d in deps))
        assert not missing, f"{stage.name}: deps missing {missing}"
