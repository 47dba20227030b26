"""Lightning Callbacks: the rollout hooks' implementations and checkpointing.

A callback implements any of `RolloutHooks`' methods; `SelfPlayModule` calls them with the
step's `SelfPlayBatch` (see RolloutHooks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from lsp import lora
from lsp.config import NonNegInt, PosInt
from lsp.io import CHECKPOINT_MARKER as MARKER
from lsp.io import CheckpointWriteError, atomic_write_text, latest_checkpoint, list_checkpoints
from lsp.selfplay import fsdp
from lsp.selfplay.records import SelfPlayBatch

log = logging.getLogger(__name__)


class RolloutHooks(Callback):
    def on_challenger_rollout_end(self, trainer, module, batch: SelfPlayBatch) -> None: ...
    def on_solver_rollout_end(self, trainer, module, batch: SelfPlayBatch) -> None: ...
    def on_rewards_computed(self, trainer, module, batch: SelfPlayBatch) -> None: ...


def _mlflow(trainer):
    """The run's MLflow logger (lsp.tracking.logger.BufferedMLFlowLogger), or None."""
    for logger in trainer.loggers:
        if hasattr(logger, "run_id") and hasattr(logger, "log_table"):
            return logger
    return None


# ---- checkpoints (listing and checks: lsp.io) ---------------------------------------------
class HFCheckpoint(Callback):
    """Every n steps: the policy as a Hugging Face folder (loads with from_pretrained), plus the
    Lightning state (optimiser, step counters, RNG, callback state) for resuming. Written into a
    temporary folder and renamed into place, so a killed run never leaves a half checkpoint.
    Several ranks: every rank takes part (Lightning's save gathers state and waits at a barrier),
    rank 0 alone writes, and the decisions (skip, folder name) are rank 0's, broadcast."""

    def __init__(self, every_n_steps: PosInt = 50, keep_last: NonNegInt = 2,
                 keep_steps: Sequence[int] = (), keep_every_n_steps: PosInt | None = None,
                 dirpath: str | None = None):
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.keep_steps = set(keep_steps or ())
        self.keep_every_n_steps = keep_every_n_steps
        self.dirpath = Path(dirpath) if dirpath else None

    def on_fit_start(self, trainer, pl_module):
        # A .tmp- folder at start is what a killed save left (one writer per run): not a
        # checkpoint (no marker), removed so they do not pile up.
        if trainer.is_global_zero and self.dirpath is not None:
            for tmp in self.dirpath.glob(".tmp-step_*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self.save(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > 0:
            self.save(trainer, pl_module, trainer.global_step)

    def save(self, trainer, module, step: int) -> Path:
        final = self.dirpath / f"step_{step:06d}"
        writer = trainer.is_global_zero
        if trainer.strategy.broadcast((final / MARKER).exists()):
            return final
        # rank 0's folder name (its pid) on every rank
        tmp = self.dirpath / f".tmp-step_{step:06d}-{os.getpid()}"
        tmp = Path(trainer.strategy.broadcast(str(tmp)))
        try:
            self._write(trainer, module, step, tmp, writer)
        except OSError as err:  # a full disk, a folder gone read-only: the previous one stays
            shutil.rmtree(tmp, ignore_errors=True)
            last = latest_checkpoint(self.dirpath)
            raise CheckpointWriteError(
                f"checkpoint of step {step}: cannot write into {self.dirpath} "
                f"({err.strerror or err}); the last complete checkpoint "
                f"({last.name if last else 'none'}) is intact: free space, then rerun with "
                "resume=true") from None
        if not writer:
            return final
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same step
        os.replace(tmp, final)
        log.info("checkpoint step %d -> %s", step, final)
        self.prune()
        return final

    def _write(self, trainer, module, step: int, tmp: Path, writer: bool) -> None:
        # sharded (fsdp): every rank gathers the full weights, rank 0 writes them
        full = fsdp.full_state_dict(module.policy) if fsdp.is_sharded(module.policy) else None
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            lora.save(module.policy, tmp, full)  # LoRA: merged export + adapter/ (lsp.lora)
            module.tokenizer.save_pretrained(tmp)
        trainer.save_checkpoint(tmp / "trainer_state.ckpt")  # every rank; rank 0 writes
        if writer:
            logger = _mlflow(trainer)
            info = {"step": step, "time": time.time(),
                    "mlflow_run_id": logger.run_id if logger else None,
                    "metrics": module.last_metrics}
            (tmp / MARKER).write_text(json.dumps(info, indent=2))  # last: marks it complete

    def keep(self, step: int) -> bool:
        every = self.keep_every_n_steps
        return step in self.keep_steps or bool(every and step % every == 0)

    def prune(self) -> None:
        found = list_checkpoints(self.dirpath)
        for path in found[: max(len(found) - self.keep_last, 0)]:
            if not self.keep(json.loads((path / MARKER).read_text())["step"]):
                shutil.rmtree(path)


# ---- sample tables --------------------------------------------------------------------------
def sample_rows(sp: SelfPlayBatch, max_rows: int) -> list[dict]:
    """One row per (query, answer); degenerate queries get one row with no answer."""
    rows, g, k = [], sp.group_size, 0
    for i, (query, ok) in enumerate(zip(sp.check.queries, sp.check.valid.tolist(), strict=True)):
        if ok and getattr(sp, "solver_queries", None) is not None:  # as the Solver saw it
            query = sp.solver_queries[k]
        base = {"step": sp.step, "query_id": i, "query": query, "valid": ok,
                "invalid_reason": sp.check.reasons[i],
                "challenger_reward": float(sp.challenger_reward[i]),
                "challenger_advantage": float(sp.challenger_advantages[i])}
        if not ok:
            rows.append(base | {"answer": None, "reward": None, "self_reward": None,
                                "solver_advantage": None})
            continue
        for j in range(g):
            rows.append(base | _answer_row(sp, k, j))
        k += 1
    return rows[:max_rows]


def _answer_row(sp: SelfPlayBatch, k: int, j: int) -> dict:
    g = sp.group_size
    self_reward = None if sp.self_rewards is None else float(sp.self_rewards[k, j])
    return {"answer": sp.solver.completions[k * g + j], "reward": float(sp.rewards[k, j]),
            "self_reward": self_reward, "solver_advantage": float(sp.solver_advantages[k, j])}


class SampleTable(RolloutHooks):
    """Every n steps: queries, answers, rewards and self-rewards as an MLflow table artifact
    (`samples/step_XXXXXX.json`) and appended to `<run_dir>/samples.jsonl` for the report."""

    def __init__(self, every_n_steps: PosInt = 10, max_rows: PosInt = 32, path: str | None = None):
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.path = Path(path) if path else None

    def on_rewards_computed(self, trainer, module, batch: SelfPlayBatch) -> None:
        step = batch.step  # the global batch: rank 0 writes it
        if (step % self.every_n_steps and step != 1) or not trainer.is_global_zero:
            return
        rows = sample_rows(batch, self.max_rows)
        if self.path is not None:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        logger = _mlflow(trainer)
        if logger is not None and rows:  # queued while the store does not answer
            table = {key: [r.get(key) for r in rows] for key in rows[0]}
            logger.log_table(table, artifact_file=f"samples/step_{step:06d}.json")


# ---- degeneration monitor -------------------------------------------------------------------
def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams across texts (1.0 = no repetition)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class DegenerationMonitor(RolloutHooks):
    """Watches for the failure modes method.md lists (adversarial nonsense, collapse onto a few
    queries, drifting length, a judge that stopped answering in format): logs `degeneration/*`
    metrics every step and warns when a threshold is crossed."""

    def __init__(self, window: PosInt = 20, min_distinct_2: float = 0.3, max_repeat_frac: float = 0.5,
                 max_parse_failure_rate: float = 0.5, max_query_len_ratio: float = 3.0):
        self.window = window
        self.thresholds = {"min_distinct_2": min_distinct_2, "max_repeat_frac": max_repeat_frac,
                           "max_parse_failure_rate": max_parse_failure_rate,
                           "max_query_len_ratio": max_query_len_ratio}
        self.recent: deque[list[str]] = deque(maxlen=window)
        self.first_query_len: float | None = None
        self.alerts = 0

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "first_query_len": self.first_query_len,
                "alerts": self.alerts}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.window)
        self.first_query_len = state["first_query_len"]
        self.alerts = state["alerts"]

    def query_metrics(self, queries: list[str], lengths: list[int]) -> dict[str, float]:
        seen = {q.strip().lower() for step in self.recent for q in step}
        self.recent.append(queries)
        window = [q for step in self.recent for q in step]
        mean_len = sum(lengths) / max(len(lengths), 1)
        self.first_query_len = self.first_query_len or mean_len or None
        return {
            "degeneration/distinct_2": distinct_n(window, 2),
            "degeneration/distinct_1": distinct_n(window, 1),
            "degeneration/repeat_frac": sum(q.strip().lower() in seen for q in queries)
            / max(len(queries), 1),
            "degeneration/unique_query_frac": len({q.strip().lower() for q in window})
            / max(len(window), 1),
            "degeneration/query_len_ratio": mean_len / (self.first_query_len or 1.0),
        }

    def on_rewards_computed(self, trainer, module, batch: SelfPlayBatch) -> None:
        # GRPO (no Challenger): queries are draws from a prompt file, with replacement; their
        # diversity and length say nothing about collapse, so only the judge is watched.
        metrics = {} if batch.challenger is None else self.query_metrics(
            batch.check.queries, batch.challenger.completion_lengths.tolist())
        judged = batch.rewards.numel() * (2 if batch.self_rewards is not None else 1) \
            if batch.rewards is not None else 0
        metrics["degeneration/parse_failure_rate"] = batch.judge_failures / max(judged, 1)
        metrics["degeneration/invalid_query_frac"] = (~batch.check.valid).float().mean().item()
        self.warn(metrics, batch.step)
        metrics["degeneration/alerts"] = float(self.alerts)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=batch.step)

    def warn(self, m: dict[str, float], step: int) -> None:
        t = self.thresholds
        checks = [
            (m["degeneration/parse_failure_rate"] > t["max_parse_failure_rate"],
             f"judge parse failures {m['degeneration/parse_failure_rate']:.0%}"),
        ]
        if "degeneration/distinct_2" in m:  # Challenger queries (absent for GRPO)
            checks += [
                (len(self.recent) >= 2 and m["degeneration/distinct_2"] < t["min_distinct_2"],
                 f"query distinct-2 {m['degeneration/distinct_2']:.2f} < {t['min_distinct_2']}"),
                (m["degeneration/repeat_frac"] > t["max_repeat_frac"],
                 f"{m['degeneration/repeat_frac']:.0%} of queries repeat recent ones"),
                (m["degeneration/query_len_ratio"] > t["max_query_len_ratio"],
                 f"query length x{m['degeneration/query_len_ratio']:.1f} since the first step"),
            ]
        for crossed, message in checks:
            if crossed:
                self.alerts += 1
                log.warning("degeneration at step %d: %s", step, message)


# ---- metrics history ------------------------------------------------------------------------
class MetricsHistory(Callback):
    """Appends each step's metrics to `<run_dir>/history.csv` (step, then sorted keys): the
    training curves for DVC plots and the report, independent of the MLflow store. A resumed
    run appends again from its checkpoint; readers keep the last row of each step.

    Not Lightning's `CSVLogger`: its writer (lightning 2.6, `_ExperimentWriter`) deletes an
    existing metrics.csv when the run folder is reused, so a resumed run would lose the killed
    run's curves, and it rewrites the header in place (not atomically) when a key appears."""

    def __init__(self, path: str | None = None):
        self.path = Path(path) if path else None
        self.columns: list[str] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = pl_module.last_metrics
        if not metrics or self.path is None or not trainer.is_global_zero:
            return
        if self.columns is None:
            self.columns = self._existing_columns() or ["step", *sorted(metrics)]
            if not self.path.exists():
                self.path.write_text(",".join(self.columns) + "\n")
        new = sorted(set(metrics) - set(self.columns))
        if new:  # e.g. no Solver metrics at step 1 (every query invalid): widen, keep the rows
            self._widen(new)
        row = {"step": trainer.global_step, **metrics}
        with self.path.open("a") as f:
            f.write(",".join(_csv_value(row.get(c)) for c in self.columns) + "\n")

    def _widen(self, new: list[str]) -> None:
        """Rewrite the file atomically with `new` columns appended (empty in earlier rows)."""
        lines = self.path.read_text().splitlines()
        self.columns = [*self.columns, *new]
        body = [line + "," * len(new) for line in lines[1:]]
        atomic_write_text(self.path, "\n".join([",".join(self.columns), *body]) + "\n")

    def _existing_columns(self) -> list[str] | None:
        if self.path.exists() and self.path.stat().st_size:
            return self.path.read_text().splitlines()[0].split(",")
        return None


def _csv_value(x) -> str:
    return "" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)


def read_history(path: str | Path) -> list[dict]:
    """history.csv -> rows (floats), the last row of each step kept (resumed runs repeat steps)."""
    import csv

    with open(path) as f:
        rows = {int(r["step"]): {k: float(v) if v else None for k, v in r.items()}
                for r in csv.DictReader(f)}
    return [rows[s] for s in sorted(rows)]
