"""A 2x2 Hydra multirun on the smoke experiment: four tagged MLflow runs and a sweep summary."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient


def run_sweep(tmp_path, *overrides: str, env_extra: dict | None = None):
    """A multirun on the smoke experiment -> (sweep folder, its MLflow runs, the job runs)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"} | (env_extra or {})
    cmd = [sys.executable, "-m", "lsp.train", "-m", "experiment=smoke", "trainer.max_steps=1",
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = list((tmp_path / "multirun").iterdir())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lsp")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep_id = '{sweep_dir.name}'")
    return sweep_dir, runs, [r for r in runs if r.data.tags.get("sweep_summary") != "true"]


def test_sweep_tags_runs_and_writes_summary(tmp_path):
    sweep_dir, runs, jobs = run_sweep(tmp_path, "algo=lsp,lsp_zero", "algo.beta=0,0.1")
    assert len(jobs) == 4
    combos = {(r.data.params["algo/name"], float(r.data.params["algo/beta"])) for r in jobs}
    assert combos == {("lsp", 0.0), ("lsp", 0.1), ("lsp_zero", 0.0), ("lsp_zero", 0.1)}
    assert all("algo.beta=" in r.data.tags["overrides"] for r in jobs)

    table = (sweep_dir / "sweep_summary.md").read_text()
    assert table.count("| lsp") == 4 and "n/a" not in table
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 10_000
    assert (sweep_dir / "sweep_curves.png").stat().st_size > 10_000
    summary = [r for r in runs if r.data.tags.get("sweep_summary") == "true"]
    assert len(summary) == 1


def test_series_labels_name_the_kl_options_the_sweep_varies():
    from lsp.study.sweep import label_series

    rows = [{"algo": "lsp_zero", "kl_placement": p, "kl_estimator": "k1"}
            for p in ("reward", "loss", "reward")]
    label_series(rows)
    assert [r["series"] for r in rows] == ["lsp_zero kl_placement=reward",
                                           "lsp_zero kl_placement=loss",
                                           "lsp_zero kl_placement=reward"]
    same = [{"algo": a, "kl_placement": "reward", "kl_estimator": "k1"} for a in ("lsp", "lsp_zero")]
    label_series(same)
    assert [r["series"] for r in same] == ["lsp", "lsp_zero"]


def test_parallel_local_sweep_keeps_the_sweep_tags(tmp_path):
    """hydra/launcher=local_parallel (joblib, 2 jobs at once, one SQLite store): both runs land,
    tagged with the sweep id, and the summary run is written."""
    sweep_dir, runs, jobs = run_sweep(tmp_path, "hydra/launcher=local_parallel", "algo.beta=0,0.1",
                                      env_extra={"OMP_NUM_THREADS": "1"})
    assert sorted(float(r.data.params["algo/beta"]) for r in jobs) == [0.0, 0.1]
    assert all(r.info.status == "FINISHED" for r in jobs)
    assert len([r for r in runs if r.data.tags.get("sweep_summary") == "true"]) == 1
    launched = (sweep_dir / "multirun.yaml").read_text()  # the sweep ran under joblib, 2 at once
    assert "JoblibLauncher" in launched and "n_jobs: 2" in launched


def test_the_sweep_creates_and_tags_the_experiment_before_its_jobs(tmp_path):
    # parallel jobs then find the experiment and its training tag in place: none of them inserts
    # the tag (two inserts at once fail on the store's unique key; lsp.tracking.mark_training)
    from omegaconf import OmegaConf

    from lsp.study.sweep import SweepSummary
    from lsp.tracking import EXPERIMENT_KIND

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = OmegaConf.create({"logger": {"tracking_uri": uri, "experiment_name": "sweep",
                                          "artifact_location": str(tmp_path / "artifacts")}})
    for _ in range(2):  # and again on a store that has it
        SweepSummary().on_multirun_start(config)
    tags = MlflowClient(uri).get_experiment_by_name("sweep").tags
    assert {k: tags.get(k) for k in EXPERIMENT_KIND} == EXPERIMENT_KIND
