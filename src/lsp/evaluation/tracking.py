"""MLflow logging for the evaluation and selection stages (SQLite store, local artifact folder).

The tracking URI is the logger config's `tracking_uri`, else `MLFLOW_TRACKING_URI`, else
`sqlite:///mlflow.db`; MLflow 3.17 refuses a plain ./mlruns file store (environment.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


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


def log_run(logger_cfg: Mapping | None, run_name: str, params: Mapping, metrics: Mapping[str, float],
            artifacts: Iterable[str | Path] = (), tags: Mapping[str, str] | None = None,
            step_metrics: Iterable[tuple[str, float, int]] = ()) -> str | None:
    """One MLflow run; returns its id (None when no logger is configured)."""
    if logger_cfg is None:
        return None
    import mlflow

    mlflow.set_tracking_uri(_uri(logger_cfg))
    name = logger_cfg.get("experiment_name") or "lsp"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = logger_cfg.get("artifact_location")
        exp_id = mlflow.create_experiment(
            name, artifact_location=Path(location).resolve().as_uri() if location else None
        )
    else:
        exp_id = experiment.experiment_id
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags or {})) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(dict(metrics))
        for key, value, step in step_metrics:
            mlflow.log_metric(key, value, step=step)
        for path in artifacts:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
        return run.info.run_id
