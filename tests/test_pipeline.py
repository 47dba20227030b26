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


@pytest.mark.parametrize("overrides", [[], ["baselines=grpo"]])
def test_stage_commands_and_deps_point_at_existing_files(tmp_path, overrides):
    """dvc.yaml resolved against params.yaml composed as committed and with the GRPO arms."""
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    compose_and_dump(tmp_path / "params.yaml", str(REPO / "conf"), None, "pipeline", "", overrides)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with Repo(str(tmp_path)) as repo:
        stages = list(repo.index.stages)
    expected = {"prepare", "train", "select", "generate", "score", "ifeval_base", "ifeval", "report"}
    assert {s.name.split("@")[0] for s in stages} >= expected | ({"prompts"} if overrides else set())
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


@pytest.mark.slow
def test_smoke_study_end_to_end(clean_copy):
    smoke = ["study=smoke", "baselines=grpo"]  # every arm: base, LSP-Zero, LSP, GRPO, LSP-then-GRPO
    _run([str(BIN / "python"), "pipelines/compose_params.py", *smoke], clean_copy)
    first = _run([str(BIN / "dvc"), "repro"], clean_copy)
    arms = ("lsp", "lsp_zero", "grpo", "lsp_grpo")
    assert {"prepare", "prompts@grpo", "report"} | {f"train@{a}" for a in arms} <= _ran(first)
    report = clean_copy / "artifacts/report/report.md"
    assert report.is_file() and (clean_copy / "artifacts/report/training_curves.png").is_file()
    assert all(f"| {a} " in report.read_text() for a in arms)
    # IFEval for the base and every arm: DVC metrics, per-prompt records, the report's table
    assert {"ifeval_base"} | {f"ifeval@{a}" for a in arms} <= _ran(first)
    for name in ("base", *arms):
        m = json.loads((clean_copy / f"metrics/ifeval/{name}.json").read_text())
        assert 0 <= m["prompt_loose"] <= 100
        assert (name == "base") != ({"delta", "p"} <= set(m))
        details = json.loads((clean_copy / f"artifacts/ifeval/{name}/details.json").read_text())
        assert details["n_prompts"] == 6 and round(100 * details["prompt_level_loose"], 1) == m["prompt_loose"]
        assert len(_lines(clean_copy / f"artifacts/ifeval/{name}/records.jsonl")) == 6
    assert "## Results: IFEval" in report.read_text()
    check_curated_metrics(clean_copy, arms)
    check_study_runs(clean_copy, arms, "workspace")
    prompts = (clean_copy / "artifacts/prompts/grpo.jsonl").read_text().splitlines()
    assert len(prompts) == 64  # the example set, none of it in AlpacaEval
    grpo_queries = {json.loads(r)["query"] for r in _lines(clean_copy / "artifacts/train/grpo/samples.jsonl")}
    # each a prompt of the set, with the constraint environment's instructions appended (the
    # study's reward, judge_constraints, is every arm's)
    instructions = [json.loads(p)["instruction"] for p in prompts]
    assert grpo_queries and all(any(q.startswith(i.rstrip() + "\n\n") for i in instructions)
                                for q in grpo_queries)
    chosen = json.loads((clean_copy / "artifacts/select/lsp/selection.json").read_text())["chosen"]
    started = OmegaConf.load(clean_copy / "artifacts/train/lsp_grpo/config.yaml")
    assert started.model.policy == started.model.reference == chosen["path"]

    second = _run([str(BIN / "dvc"), "repro"], clean_copy)
    assert _ran(second) == set(), second

    # `dvc exp run -S` composes conf/ afresh with exactly its overrides (DVC's Hydra support)
    sets = [a for o in [*smoke, "arms.lsp.algo.beta=0.1"] for a in ("-S", o)]
    third = _run([str(BIN / "dvc"), "exp", "run", *sets], clean_copy)
    diff = _run([str(BIN / "dvc"), "params", "diff", "--all"], clean_copy)
    assert re.search(r"arms\.lsp\.algo\.beta\s+0\.05\s+0\.1", diff), diff
    # LSP and everything after it, the continuation from LSP's checkpoint included; nothing else
    assert {"train@lsp", "select@lsp", "train@lsp_grpo", "score@lsp_grpo", "report"} <= _ran(third)
    assert not {"prepare", "prompts@grpo", "train@lsp_zero", "train@grpo", "generate_base"} & _ran(third)
    exp = _run([str(BIN / "dvc"), "exp", "ls", "--name-only"], clean_copy).split()
    assert len(exp) == 1, exp
    check_study_runs(clean_copy, ("lsp", "lsp_grpo"), exp[0])
    # the README's comparison of experiments on one figure fits a terminal
    shown = _run([str(BIN / "dvc"), "exp", "show", "--drop", ".*", "--keep",
                  r"Experiment|^algo.beta$|.*ifeval/lsp(_zero)?.json:prompt_strict$"], clean_copy)
    assert shown.count(":prompt_strict") == 2 and max(map(len, shown.splitlines())) <= METRICS_WIDTH, shown


METRICS_WIDTH = 160  # "a normal terminal" (the README shows these tables)


def check_curated_metrics(root: Path, arms: tuple[str, ...]) -> None:
    """The DVC metrics are the handful of curated figures (lsp.headline), and their table fits."""
    shown = _run([str(BIN / "dvc"), "metrics", "show"], root)
    lines = shown.strip().splitlines()
    header = lines[0].split()
    assert header == ["Path", "delta", "kl", "lc_win_rate", "p", "prompt_loose",
                      "prompt_strict", "reward", "step", "win_rate", "win_se"], shown
    assert len(lines) == 1 + 4 * len(arms) + 1  # train, select, alpaca_eval, ifeval per arm; base
    assert max(map(len, lines)) <= METRICS_WIDTH, shown
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
        base = [r for r in runs if r.data.tags.get("lsp.arm") == "base" and r.data.tags.get("lsp.role") == "parent"]
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
    compose_and_dump(tmp_path / "params.yaml", str(REPO / "conf"), None, "pipeline", "",
                     ["baselines=grpo"])
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with Repo(str(tmp_path)) as repo:
        stages = list(repo.index.stages)
    for stage in stages:
        deps = [d.def_path.rstrip("/") for d in stage.deps]
        needed = _closure(stage.cmd.split()[1])
        missing = sorted(p for p in needed
                         if not any(p == d or p.startswith(d + "/") for d in deps))
        assert not missing, f"{stage.name}: deps missing {missing}"
