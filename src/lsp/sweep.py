"""Hydra multirun sweeps -> MLflow: every job is an MLflow run tagged with the sweep id and its
overrides (lsp.train); when the sweep ends, `SweepSummary` (a Hydra callback, conf/train.yaml)
writes a table and a plot of the chosen metric against beta for each algo, into the sweep folder
and as artifacts of a summary run in the same MLflow experiment.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def sweep_runs(client: MlflowClient, experiment_name: str, sweep_id: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    query = f"tags.sweep_id = '{sweep_id}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=query)
    return [r for r in runs if r.data.tags.get("sweep_summary") != "true"]


def final_value(client: MlflowClient, run_id: str, metric: str, last_k: int) -> float | None:
    """Mean of the metric over the run's last k logged steps (less noisy than the last one)."""
    history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
    tail = [m.value for m in history[-last_k:]]
    return sum(tail) / len(tail) if tail else None


def summary_rows(client: MlflowClient, runs: list, metric: str, last_k: int) -> list[dict]:
    rows = []
    for run in runs:
        params = run.data.params
        rows.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name,
            "overrides": run.data.tags.get("overrides", ""),
            "algo": params.get("algo/name", "?"), "beta": float(params.get("algo/beta", "nan")),
            "status": run.info.status, metric: final_value(client, run.info.run_id, metric, last_k),
        })
    return sorted(rows, key=lambda r: (r["algo"], r["beta"]))


def write_table(rows: list[dict], metric: str, path: Path) -> None:
    head = ["algo", "beta", metric, "status", "overrides", "run_id"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = "n/a" if r[metric] is None else f"{r[metric]:.4f}"
        cells = [r["algo"], f"{r['beta']:g}", value, r["status"], r["overrides"], r["run_id"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot_metric_vs_beta(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in sorted({r["algo"] for r in rows}):
        pts = sorted((r["beta"], r[metric]) for r in rows if r["algo"] == algo and r[metric] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=algo)
    if ax.lines:
        ax.legend()
    ax.set_xlabel("beta (KL weight)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs beta")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize_sweep(tracking_uri: str, experiment_name: str, sweep_id: str, out_dir: Path,
                    metric: str = "solver/reward_mean", last_k: int = 5) -> list[dict]:
    client = MlflowClient(tracking_uri)
    rows = summary_rows(client, sweep_runs(client, experiment_name, sweep_id), metric, last_k)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, plot = out_dir / "sweep_summary.md", out_dir / "sweep_summary.png"
    write_table(rows, metric, table)
    plot_metric_vs_beta(rows, metric, plot)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=f"sweep-{sweep_id}",
                          tags={"sweep_id": sweep_id, "sweep_summary": "true"}):
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(plot))
    log.info("sweep %s: %d runs summarised in %s", sweep_id, len(rows), out_dir)
    return rows


class SweepSummary(Callback):
    def __init__(self, metric: str = "solver/reward_mean", last_k: int = 5):
        self.metric = metric
        self.last_k = last_k

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        tracking_uri = config.logger.tracking_uri
        summarize_sweep(tracking_uri, config.logger.experiment_name, sweep_dir.name, sweep_dir,
                        self.metric, self.last_k)
