"""Shared fixtures. Tiny models are built once per session into a temporary model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed `train` config, as `python -m lsp.train` sees it."""

    def _compose(*overrides: str, config_name: str = "train"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))

    return _compose


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own SQLite MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path
