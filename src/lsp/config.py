"""Config validation, once, at the entry point: one clear message naming the key."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lsp.advantages import INVALID_QUERY_RULES
from lsp.errors import InputError
from lsp.losses import AGGREGATIONS, KL_ESTIMATORS, KL_PLACEMENTS


class ConfigError(InputError):
    pass


def _get(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default="__absent__")
    if value == "__absent__":
        raise ConfigError(f"config key '{key}' is missing")
    return value


def _require(cfg: DictConfig, key: str, ok, why: str) -> None:
    value = _get(cfg, key)
    try:
        good = ok(value)
    except (TypeError, ValueError):  # e.g. int("abc"): the wrong type is bad input, not a crash
        good = False
    if not good:
        raise ConfigError(f"invalid config: {key}={value!r}: {why}")


def _one_of(options):
    return lambda v: v in options, f"expected one of {list(options)}"


def _sampling_rules(role: str) -> list:
    key = f"rollout.{role}"
    return [
        (f"{key}.temperature", lambda v: float(v) > 0, "must be > 0"),
        (f"{key}.top_p", lambda v: 0 < float(v) <= 1, "must be in (0, 1]"),
        (f"{key}.top_k", lambda v: int(v) >= 0, "must be >= 0 (0 disables top-k)"),
        # Training and reference log-probs (so the gradient and the KL) are taken under
        # logits / temperature; a truncating sampler would make them those of another
        # distribution (off-policy), and pi_ref may give a sampled token probability 0 there
        # (an infinite KL). So the trained roles sample untruncated, at any temperature.
        (f"{key}.top_p", lambda v: float(v) == 1.0, ON_POLICY),
        (f"{key}.top_k", lambda v: int(v) == 0, ON_POLICY),
    ]


ON_POLICY = ("the trained roles must sample from the distribution their log-probs are taken "
             "under (logits / temperature): use top_p=1.0 and top_k=0 (temperature may vary)")

RULES = [
    ("rollout.num_queries", lambda v: int(v) >= 1, "need at least one query per step"),
    ("rollout.group_size", lambda v: int(v) >= 2,
     "the Solver's group-mean baseline needs at least 2 answers per query"),
    ("rollout.challenger.max_new_tokens", lambda v: int(v) >= 1, "must be >= 1"),
    ("rollout.solver.max_new_tokens", lambda v: int(v) >= 1, "must be >= 1"),
    *[rule for role in ("challenger", "solver") for rule in _sampling_rules(role)],
    ("algo.beta", lambda v: float(v) >= 0, "the KL weight must be >= 0"),
    ("algo.alpha_ch", lambda v: float(v) >= 0, "the Challenger loss weight must be >= 0"),
    ("algo.kl_estimator", *_one_of(KL_ESTIMATORS)),
    ("algo.kl_placement", *_one_of(KL_PLACEMENTS)),
    ("algo.aggregation", *_one_of(AGGREGATIONS)),
    ("algo.invalid_query", *_one_of(INVALID_QUERY_RULES)),
    ("algo.self_reward.mode", *_one_of(("generate", "logits"))),
    ("model.amp", *_one_of(("auto", "bfloat16", "none"))),
    ("model.attn_implementation", *_one_of(("auto", "grouped", "sdpa", "eager"))),
    ("rollout.challenger.engine", *_one_of(("lsp", "hf", "vllm"))),
    ("rollout.solver.engine", *_one_of(("lsp", "hf", "vllm"))),
    ("algo.self_reward.engine", *_one_of(("lsp", "hf", "vllm"))),
    ("rollout.vllm.max_model_len", lambda v: int(v) >= 16, "must be >= 16 tokens"),
    ("rollout.vllm.kv_cache_gb", lambda v: int(v) >= 1, "must be >= 1 (GiB)"),
    ("model.dtype", *_one_of(("float32", "bfloat16"))),
    ("model.reference_dtype", *_one_of(("float32", "bfloat16", "float16"))),
    ("model.chat_date", lambda v: isinstance(v, str) and bool(v.strip()),
     "the date chat templates see: a non-empty string such as '26 Jul 2024'"),
    ("trainer.max_steps", lambda v: int(v) >= 1, "must be >= 1"),
    ("trainer.micro_batch_size", lambda v: int(v) >= 1, "must be >= 1"),
    ("trainer.num_nodes", lambda v: int(v) >= 1, "must be >= 1"),
    ("optim.lr", lambda v: float(v) > 0, "the learning rate must be > 0"),
    # mixed precision is model.amp (lsp.rollout.autocast: the rollout and log-prob passes too);
    # Lightning's *-mixed plugins would autocast only part of the step
    ("trainer.precision", *_one_of(("32-true", "32", "bf16-true", "16-true"))),
]


def validate(cfg: DictConfig) -> None:
    for key, ok, why in RULES:
        _require(cfg, key, ok, why)
    if cfg.algo.kl_placement == "reward" and cfg.algo.kl_estimator != "k1":
        raise ConfigError(
            f"invalid config: algo.kl_estimator={cfg.algo.kl_estimator!r} with "
            "algo.kl_placement='reward': only k1 is an unbiased reward penalty"
        )
    if cfg.algo.name == "grpo" and not cfg.rollout.prompt_file:
        raise ConfigError("invalid config: algo=grpo needs rollout.prompt_file (its training prompts)")
    if cfg.algo.name != "grpo" and cfg.rollout.prompt_file:
        # the prompt file replaces the Challenger: only the GRPO baseline may have one
        raise ConfigError(f"invalid config: rollout.prompt_file is set but algo={cfg.algo.name} "
                          "plays the Challenger; use algo=grpo or unset rollout.prompt_file")
    strategies = ["auto", *(_get(cfg, "trainer.strategies") or {})]
    _require(cfg, "trainer.strategy", lambda v: v in strategies,
             f"expected one of {strategies} (trainer.strategies)")
    for key in ("model.policy", "model.reference", "reward.model", "reward._target_"):
        _require(cfg, key, lambda v: bool(v), "must name a model / class")


def check_models(cfg: DictConfig) -> None:
    """Resolve every model spec now, so that a missing one fails before any work, by key."""
    from lsp.models import ModelUnavailableError, resolve_model

    keys = ["model.policy", "model.reference", "reward.model"]
    if cfg.algo.self_reward.enabled:
        keys.append("algo.self_reward.model")
    for key in keys:
        try:
            resolve_model(_get(cfg, key), cfg.model.cache_dir)
        except ModelUnavailableError as err:
            raise ConfigError(f"{key}: {err}") from None
