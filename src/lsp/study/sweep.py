"""Hydra multirun sweeps -> MLflow: every job is an MLflow run tagged with the sweep id and its
overrides (lsp.train); when the sweep ends, `SweepSummary` (a Hydra callback, conf/train.yaml)
writes, into the sweep folder and as artifacts of a summary run in the same MLflow experiment:
- sweep_summary.{md,png}: the chosen metric (mean of the last k steps) against beta, one series
  per variant: the algo, plus the KL options (placement, estimator) when the sweep varies them;
- sweep_curves.png: the per-step curves of `curves` (default: both KL terms and the Solver reward),
  one line per run, so that a KL that drifts is seen as it drifts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient

from lsp.tracking import mark_training

log = logging.getLogger(__name__)
DEFAULT_CURVES = ("kl/challenger", "kl/solver", "solver/reward_mean")


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


VARIANT_KEYS = ("kl_placement", "kl_estimator")  # shown in a series label when the sweep varies them


def summary_rows(client: MlflowClient, runs: list, metric: str, last_k: int) -> list[dict]:
    rows = []
    for run in runs:
        params = run.data.params
        rows.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name,
            "overrides": run.data.tags.get("overrides", ""),
            "algo": params.get("algo/name", "?"), "beta": float(params.get("algo/beta", "nan")),
            **{k: params.get(f"algo/{k}", "?") for k in VARIANT_KEYS},
            "status": run.info.status, metric: final_value(client, run.info.run_id, metric, last_k),
        })
    label_series(rows)
    return sorted(rows, key=lambda r: (r["series"], r["beta"]))


def label_series(rows: list[dict]) -> None:
    """rows[i]["series"]: the algo, plus each KL option whose value differs across the rows."""
    varying = [k for k in VARIANT_KEYS if len({r[k] for r in rows}) > 1]
    for r in rows:
        r["series"] = " ".join([r["algo"], *(f"{k}={r[k]}" for k in varying)])


def write_table(rows: list[dict], metric: str, path: Path) -> None:
    head = ["series", "beta", metric, "status", "overrides", "run_id"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = "n/a" if r[metric] is None else f"{r[metric]:.4f}"
        cells = [r["series"], f"{r['beta']:g}", value, r["status"], r["overrides"], r["run_id"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot_metric_vs_beta(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for series in sorted({r["series"] for r in rows}):
        pts = sorted((r["beta"], r[metric]) for r in rows
                     if r["series"] == series and r[metric] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=series)
    if ax.lines:
        ax.legend()
    ax.set_xlabel("beta (KL weight)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs beta")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(client: MlflowClient, rows: list[dict], metrics: list[str], path: Path) -> None:
    """One panel per metric, one line per run (its series and beta) over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for r in rows:
            history = sorted(client.get_metric_history(r["run_id"], metric), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history],
                        label=f"{r['series']} beta={r['beta']:g}")
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    legend = {}  # label -> handle, from every panel (a GRPO run has no Challenger curve)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize_sweep(tracking_uri: str, experiment_name: str, sweep_id: str, out_dir: Path,
                    metric: str = "solver/reward_mean", last_k: int = 5,
                    curves: list[str] | None = None) -> list[dict]:
    client = MlflowClient(tracking_uri)
    rows = summary_rows(client, sweep_runs(client, experiment_name, sweep_id), metric, last_k)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, plot = out_dir / "sweep_summary.md", out_dir / "sweep_summary.png"
    curve_plot = out_dir / "sweep_curves.png"
    write_table(rows, metric, table)
    plot_metric_vs_beta(rows, metric, plot)
    plot_curves(client, rows, list(curves or DEFAULT_CURVES), curve_plot)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=f"sweep-{sweep_id}",
                          tags={"sweep_id": sweep_id, "sweep_summary": "true"}):
        for path in (table, plot, curve_plot):
            mlflow.log_artifact(str(path))
    log.info("sweep %s: %d runs summarised in %s", sweep_id, len(rows), out_dir)
    return rows


class SweepSummary(Callback):
    def __init__(self, metric: str = "solver/reward_mean", last_k: int = 5,
                 curves: list[str] | None = None):
        self.metric = metric
        self.last_k = last_k
        self.curves = list(curves or DEFAULT_CURVES)

    def on_multirun_start(self, config, **kwargs) -> None:
        """Create the tracking store and the experiment once, before any job starts: parallel
        jobs (hydra/launcher=local_parallel) would otherwise race to create the SQLite schema
        ("table already exists"), the experiment and its tags (a duplicate-key insert)."""
        lg = config.logger
        client = MlflowClient(lg.tracking_uri)
        experiment = client.get_experiment_by_name(lg.experiment_name)
        if experiment is None:
            location = lg.artifact_location
            exp_id = client.create_experiment(lg.experiment_name, artifact_location=(
                Path(location).resolve().as_uri() if location else None))
        else:
            exp_id = experiment.experiment_id
        mark_training(client, exp_id)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        tracking_uri = config.logger.tracking_uri
        sweep_id = str(config.get("sweep_id") or sweep_dir.name)  # lsp.train tags runs the same way
        summarize_sweep(tracking_uri, config.logger.experiment_name, sweep_id, sweep_dir,
                        self.metric, self.last_k, self.curves)
