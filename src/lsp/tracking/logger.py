"""Training's MLflow logger, which survives an outage of the tracking server.

Lightning's MLFlowLogger raises when the store does not answer, which would kill a training run
over a monitoring problem. `BufferedMLFlowLogger` queues what it could not log (step metrics, the
sample tables) and training goes on; it retries at most every `retry_every_s` seconds (for an
http(s) store, only once the server's /health answers), then logs the queue in order, each metric
at its own step. history.csv and samples.jsonl are written locally whatever MLflow does, so a run
killed during an outage loses its queue from MLflow only; `finalize` tries a last time and says
what it could not log.

MLflow's own client retries a failed request with exponential backoff (7 retries by default,
minutes). An http(s) store gets `MLFLOW_HTTP_REQUEST_MAX_RETRIES=2` unless the user set it, so a
down server costs seconds, not minutes, before the queue takes over.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Mapping

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from lsp.errors import InputError
from lsp.tracking import mark_training

log = logging.getLogger(__name__)


class TrackingUnavailableError(InputError):
    """The MLflow store does not answer when the run starts (nothing was trained yet)."""


def open_run(logger: MLFlowLogger, params: dict | None) -> None:
    """Create (or reopen) the run and log the config: the one MLflow call a run cannot start
    without, so an unreachable store is a clear error here rather than mid-run."""

    try:
        _ = logger.run_id
        mark_training(logger.experiment, logger.experiment_id)
        if params is not None:
            logger.log_hyperparams(params)
    except Exception as err:  # MlflowException, requests' ConnectionError, sqlite errors, ...
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise TrackingUnavailableError(
            f"logger.tracking_uri={logger._tracking_uri}: the MLflow store does not answer "
            f"({first})") from None


class BufferedMLFlowLogger(MLFlowLogger):
    def __init__(self, *args, retry_every_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_every_s = retry_every_s
        self.pending: list[tuple[str, object, object]] = []  # ("metrics"|"table", payload, where)
        self.failures = 0  # failed attempts (each one queued or kept the queue)
        self.down_since: float | None = None
        self.last_try = 0.0
        if self._tracking_uri and self._tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.pending.append(("metrics", dict(metrics), step))
        self.flush()

    @rank_zero_only
    def log_table(self, data: dict, artifact_file: str) -> None:
        self.pending.append(("table", data, artifact_file))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Log the queue in order; False (queue kept) while the store does not answer."""
        now = time.monotonic()
        if self.down_since is not None and not force:
            if now - self.last_try < self.retry_every_s:
                return False
            self.last_try = now
            if not self._reachable():
                return False
        while self.pending:
            kind, payload, where = self.pending[0]
            try:
                self._send(kind, payload, where)
            except Exception as err:  # MlflowException, requests' ConnectionError, OSError, ...
                self._went_down(err, now)
                return False
            self.pending.pop(0)
        if self.down_since is not None:
            log.warning("MLflow store %s answers again after %.0f s: the queued records are "
                        "logged", self._tracking_uri, now - self.down_since)
            self.down_since = None
        return True

    def _send(self, kind: str, payload, where) -> None:
        if kind == "metrics":
            super().log_metrics(payload, where)
        else:
            self.experiment.log_table(self.run_id, data=payload, artifact_file=where)

    def _went_down(self, err: Exception, now: float) -> None:
        self.failures += 1
        self.last_try = now
        if self.down_since is None:
            self.down_since = now
            log.warning("MLflow store %s does not answer (%s: %s): training continues, metrics "
                        "are queued (history.csv has every step) and retried every %.0f s",
                        self._tracking_uri, type(err).__name__, str(err).splitlines()[0][:200],
                        self.retry_every_s)

    def _reachable(self) -> bool:
        uri = self._tracking_uri or ""
        if not uri.startswith(("http://", "https://")):
            return True  # a local store: just try
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=2):
                return True
        except OSError:
            return False

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self.flush(force=True):
            log.error("MLflow store %s still does not answer: %d queued records (steps) are not "
                      "in MLflow; history.csv and samples.jsonl hold them, and the run stays "
                      "open there", self._tracking_uri, len(self.pending))
            return
        try:
            super().finalize(status)
        except Exception as err:
            log.error("MLflow store %s: could not close the run (%s)", self._tracking_uri, err)
