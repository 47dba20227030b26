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


def eval_config(params: DictConfig, name: str) -> DictConfig:
    """The `lsp.evaluate` config of one study model: the arm as candidate, the prepared base
    model as baseline, generations shared through artifacts/generate/."""
    cfg = OmegaConf.create({
        "model": params.model, "eval": params.eval, "logger": params.logger,
        "candidate": {"model": str(BASE_MODEL), "name": name, "selection": None},
        "base": {"model": str(BASE_MODEL), "name": "base"},
        "out_dir": str(evaluate_dir(name)), "generations_dir": str(ARTIFACTS / "generate" / "{generator}"),
        "device": params.device, "model_cache_dir": params.model_cache_dir, "seed": params.seed,
    })
    use_prepared_base(cfg, params.model.policy, ["eval.judge.model"])
    cfg.logger.run_name = f"{params.study_name}-evaluate-{name}"
    return cfg
