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
        m = json.loads((clean_copy / f"artifacts/ifeval/{name}/metrics.json").read_text())
        assert m["n_prompts"] == 6 and 0 <= m["prompt_level_loose"] <= 1
        assert (name == "base") != ("vs_base_prompt_loose" in m)
        assert len(_lines(clean_copy / f"artifacts/ifeval/{name}/records.jsonl")) == 6
    assert "## Results: IFEval" in report.read_text()
    assert "prompt_level_loose" in _run([str(BIN / "dvc"), "metrics", "show"], clean_copy)
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
    return {p for p in seen if not p.endswith("__init__.py")}


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
