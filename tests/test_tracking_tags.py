"""lsp.tracking.mark_training on a real SQLite MLflow store, when another job of a parallel sweep
tags the same new experiment at the same moment (seen in `make test`: the loser's insert failed
on the store's unique key and the run stopped with "the MLflow store does not answer").

A true race cannot be scheduled in a test, so the other job is a second client on the same store
that sets the tag first, and this client's own insert then fails as the store's did."""

from __future__ import annotations

import sqlite3

import pytest
from mlflow import MlflowClient

from lsp.tracking import EXPERIMENT_KIND, mark_training

UNIQUE = "UNIQUE constraint failed: experiment_tags.key, experiment_tags.experiment_id"


class LosesTheRace(MlflowClient):
    """A client whose tag insert comes second: `other` (or nobody) has written the tag."""

    def __init__(self, uri: str, other: MlflowClient | None):
        super().__init__(tracking_uri=uri)
        self.other, self.attempts = other, 0

    def set_experiment_tag(self, experiment_id, key, value):
        self.attempts += 1
        if self.other is not None:
            self.other.set_experiment_tag(experiment_id, key, value)
        raise sqlite3.IntegrityError(UNIQUE)


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri).create_experiment("sweep")


def test_a_tag_written_meanwhile_by_another_job_is_not_an_error(store):
    uri, exp_id = store
    client = LosesTheRace(uri, other=MlflowClient(tracking_uri=uri))
    mark_training(client, exp_id)
    assert client.attempts == len(EXPERIMENT_KIND)
    tags = MlflowClient(tracking_uri=uri).get_experiment(exp_id).tags
    assert {k: tags.get(k) for k in EXPERIMENT_KIND} == EXPERIMENT_KIND


def test_a_failed_tag_that_nobody_wrote_still_raises(store):
    uri, exp_id = store
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint"):
        mark_training(LosesTheRace(uri, other=None), exp_id)


def test_an_experiment_already_tagged_is_left_alone(store):
    uri, exp_id = store
    mark_training(MlflowClient(tracking_uri=uri), exp_id)
    client = LosesTheRace(uri, other=None)
    mark_training(client, exp_id)  # would raise if it tried to write
    assert client.attempts == 0
