"""The DVC study's shared plumbing: params.yaml (composed from conf/pipeline.yaml) -> the config
each lsp entry point takes, and the fixed artifact paths of every stage."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ARTIFACTS = Path("artifacts")
BASE_MODEL = ARTIFACTS / "base" / "model"  # the prepared base model (a transformers folder)
TRAIN_KEYS = ("model", "reward", "rollout", "optim", "trainer", "logger", "callbacks",
              "seed", "device")


def load_params(path: str | Path = "params.yaml") -> DictConfig:
    return OmegaConf.load(path)


def use_prepared_base(cfg: DictConfig, base_spec: str, keys: list[str]) -> None:
    """Every model spec that names the base model reads the prepared folder instead."""
    for key in keys:
        if OmegaConf.select(cfg, key) == base_spec:
            OmegaConf.update(cfg, key, str(BASE_MODEL))


def train_config(params: DictConfig, arm: str) -> DictConfig:
    cfg = OmegaConf.create({k: params[k] for k in TRAIN_KEYS})
    cfg.algo = params.arms[arm].algo
    cfg.name, cfg.run_dir, cfg.resume, cfg.sweep_id = arm, str(train_dir(arm)), False, None
    keys = ["model.policy", "model.reference", "reward.model", "algo.self_reward.model"]
    use_prepared_base(cfg, params.model.policy, keys)
    cfg.logger.run_name = f"{params.study_name}-{arm}"
    return cfg


def train_dir(arm: str) -> Path:
    return ARTIFACTS / "train" / arm


def select_dir(arm: str) -> Path:
    return ARTIFACTS / "select" / arm


def generate_dir(arm: str) -> Path:
    return ARTIFACTS / "generate" / arm


def evaluate_dir(arm: str) -> Path:
    return ARTIFACTS / "evaluate" / arm
