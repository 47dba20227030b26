"""MLflow for every stage: the runs of evaluation, selection and IFEval, a study's parent runs and
tags, and the curated figures on them. The training run's Lightning logger is `lsp.tracking.logger`
(kept apart: importing Lightning costs seconds, which the other stages need not pay).

The tracking URI is the logger config's `tracking_uri`, else `MLFLOW_TRACKING_URI`, else
`sqlite:///mlflow.db`; MLflow 3.17 refuses a plain ./mlruns file store (environment.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from lsp.io import atomic_write_json


def flatten(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> slash-namespaced finite numbers (`vs_base/overall/win_rate`)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        elif isinstance(value, int | float) and math.isfinite(value):  # bools included
            flat[name] = float(value)
    return flat


def _uri(logger_cfg: Mapping) -> str:
    return logger_cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def log_to_existing_run(logger_cfg: Mapping | None, run_id: str | None, metrics: Mapping[str, float],
                        step: int) -> bool:
    """Add metrics to another run (the training run a checkpoint came from), if the store has it:
    sweeps are then compared on their evaluation numbers in the MLflow UI."""
    if logger_cfg is None or not run_id:
        return False
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=_uri(logger_cfg))
    try:
        client.get_run(run_id)
    except Exception:  # another store, or a deleted run
        return False
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    return True


# MLflow 3's UI opens an experiment on its GenAI traces page unless the experiment says it holds
# model training runs (the UI's own experiment kinds; "custom_model_development" opens on runs).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows the run under it


def experiment_id(logger_cfg: Mapping) -> str:
    """The logger's experiment (created if missing, with its artifact location), marked as a
    training experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=_uri(logger_cfg))
    name = logger_cfg.get("experiment_name") or "lsp"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = logger_cfg.get("artifact_location")
        try:
            exp_id = client.create_experiment(
                name, artifact_location=Path(location).resolve().as_uri() if location else None)
        except Exception:  # created meanwhile by a parallel job
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = experiment.experiment_id
    mark_training(client, exp_id)
    return exp_id


def mark_training(client, exp_id: str) -> None:
    """Tag the experiment as a training one (once; also for the Lightning logger, BufferedMLFlowLogger below)."""
    tags = client.get_experiment(exp_id).tags
    for key, value in EXPERIMENT_KIND.items():
        if tags.get(key) == value:
            continue
        try:
            client.set_experiment_tag(exp_id, key, value)
        except Exception:
            # The parallel jobs of a sweep (hydra/launcher=local_parallel, one SQLite store) tag
            # the new experiment at the same moment: both find the tag missing, both insert it,
            # and the second insert fails on the store's unique key ("UNIQUE constraint failed:
            # experiment_tags.key, ..."). The tag is then there, with this value: nothing lost.
            if client.get_experiment(exp_id).tags.get(key) != value:
                raise


def run_tags(logger_cfg: Mapping, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """The call's tags, then the logger config's own (a study's: study, arm, stage, DVC
    experiment, commit; they win) and its parent run."""
    out = dict(tags or {}) | {str(k): str(v) for k, v in (logger_cfg.get("tags") or {}).items()}
    if logger_cfg.get("parent_run_id"):
        out[PARENT_TAG] = str(logger_cfg["parent_run_id"])
    return out


def parent_run(logger_cfg: Mapping, run_name: str, tags: Mapping[str, str], new: bool,
               extra: Mapping[str, str] | None = None, params: Mapping | None = None) -> str:
    """The id of the newest run of the experiment carrying all `tags` (an arm's parent
    run in a study), or of a new one when `new` or none exists. A parent holds no work of its
    own: it groups the arm's stage runs and carries their headline figures."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=_uri(logger_cfg))
    exp_id = experiment_id(logger_cfg)
    if not new:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                   max_results=1)
        if found:
            return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={**tags, **(extra or {})})
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, str(value)[:500])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_run(logger_cfg: Mapping | None, run_name: str, params: Mapping, metrics: Mapping[str, float],
            artifacts: Iterable[str | Path] = (), tags: Mapping[str, str] | None = None,
            step_metrics: Iterable[tuple[str, float, int]] = ()) -> str | None:
    """One MLflow run; returns its id (None when no logger is configured)."""
    if logger_cfg is None:
        return None
    import mlflow

    mlflow.set_tracking_uri(_uri(logger_cfg))
    exp_id = experiment_id(logger_cfg)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                          tags=run_tags(logger_cfg, tags)) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(dict(metrics))
        for key, value, step in step_metrics:
            mlflow.log_metric(key, value, step=step)
        for path in artifacts:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
        return run.info.run_id


def numeric(figures: Mapping, prefix: str) -> dict[str, float]:
    """The numbers among the figures, `prefix/`-named (an arm's MLflow parent run)."""
    return {f"{prefix}/{k}": float(v) for k, v in figures.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def publish_figures(figures: Mapping, path: str | Path, logger_cfg: Mapping | None,
                    prefix: str) -> None:
    """A stage's headline figures (lsp.headline): atomically to `path` (the DVC metrics file),
    and onto the parent run, `prefix/`-named, when the logger has one (a study): the arms are
    then compared on their parent runs."""
    atomic_write_json(path, figures)
    if logger_cfg is None or not logger_cfg.get("parent_run_id"):
        return
    from mlflow import MlflowClient

    if log_to_existing_run(logger_cfg, logger_cfg["parent_run_id"], numeric(figures, prefix), 0):
        # the parent's end time: its last stage's, so its duration spans the arm's stages
        MlflowClient(tracking_uri=_uri(logger_cfg)).set_terminated(logger_cfg["parent_run_id"], "FINISHED")
