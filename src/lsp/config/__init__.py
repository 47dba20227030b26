"""The typed schema of every entry point's config, checked once at the boundary.

`validate(cfg, kind)` checks a composed config (train, select, evaluate, ifeval) against its
pydantic model: types, ranges, choices, cross-field rules and unknown keys, anywhere in the tree.
The first problem becomes one `ConfigError` line naming the key, the value and what is allowed.

A Hydra `_target_` node (reward, self-reward, optimiser, callbacks, strategies, judge) takes its
schema from its target: its keys must be parameters of the target's signature (unless it takes
**kwargs), parameters without a default must be given (except those the code passes itself, such
as the model pool), and annotated parameters are type-checked. Nested `_target_` nodes (a
composite reward's components) are checked the same way.

The package: `checks` (field types, the `_target_` check, ConfigError), `schema` (the pydantic
sections), here (the cross-section rules, `validate`, `check_models`). Everything other modules
use is imported from `lsp.config`.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from lsp.config.checks import ConfigError, NonNegInt, PosInt, _check_target, _typed
from lsp.config.schema import EvaluateConfig, IFEvalConfig, SelectConfig, StudyParams, TrainConfig

# What other modules import from lsp.config; the field types and sections live in checks/schema.
__all__ = ["ConfigError", "NonNegInt", "PosInt", "check_models", "validate"]


# --------------------------------------------------------------------------- rules across sections


def _train_rules(cfg: dict) -> None:
    """Rules across sections (messages name the keys themselves)."""
    algo, rollout, trainer = cfg["algo"], cfg["rollout"], cfg["trainer"]
    if algo["kl_placement"] == "reward" and algo["kl_estimator"] != "k1":
        raise ConfigError(f"invalid config: algo.kl_estimator={algo['kl_estimator']!r} with "
                          "algo.kl_placement='reward': only k1 is an unbiased reward penalty")
    if algo["name"] == "grpo" and not rollout["prompt_file"]:
        raise ConfigError("invalid config: algo=grpo needs rollout.prompt_file (its training prompts)")
    if algo["name"] != "grpo" and rollout["prompt_file"]:
        # the prompt file replaces the Challenger: only the GRPO baseline may have one
        raise ConfigError(f"invalid config: rollout.prompt_file is set but algo={algo['name']} "
                          "plays the Challenger; use algo=grpo or unset rollout.prompt_file")
    strategies = ["auto", *trainer["strategies"]]
    if trainer["strategy"] not in strategies:
        raise ConfigError(f"invalid config: trainer.strategy={trainer['strategy']!r}: expected one "
                          f"of {strategies} (trainer.strategies)")
    _self_reward(algo["self_reward"])


def _self_reward(node: dict) -> None:
    """algo.self_reward: `enabled`, `weight`, and (when enabled) a QualitySelfReward-like node."""
    node = dict(node)
    for key, kind in (("enabled", bool), ("weight", float)):
        if key not in node:
            raise ConfigError(f"config key 'algo.self_reward.{key}' is missing")
        _typed(node.pop(key), kind, f"algo.self_reward.{key}")
    if "_target_" in node:
        try:
            _check_target(node, {"pool"})
        except PydanticCustomError as err:
            raise ConfigError(f"invalid config: algo.self_reward.{err.context['key']}"
                              f"{err.message()}") from None


SCHEMAS = {"train": (TrainConfig, _train_rules), "select": (SelectConfig, None),
           "evaluate": (EvaluateConfig, None), "ifeval": (IFEvalConfig, None),
           "study": (StudyParams, None)}


# --------------------------------------------------------------------------- the check


def validate(cfg: DictConfig, kind: str = "train") -> None:
    """Check `cfg` against the `kind` schema; raise one ConfigError line for the first problem."""
    schema, rules = SCHEMAS[kind]
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"config key '{err.full_key}' is missing (???): set it") from None
    try:
        schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err.errors()[0], schema)) from None
    if rules:
        rules(data)


def _one_line(e: dict, schema: type[BaseModel]) -> str:
    loc = [str(p) for p in e["loc"] if not _is_branch_tag(p)]
    if e["type"] == "lsp_key":  # a problem inside a _target_ node: its key is in the context
        return f"invalid config: {'.'.join(loc)}.{e['ctx']['key']}{e['msg']}"
    key = ".".join(loc)
    if e["type"] == "missing":
        return f"config key '{key}' is missing"
    if e["type"] == "extra_forbidden":
        allowed = _fields_at(schema, loc[:-1])
        where = ".".join(loc[:-1]) or "the top level"
        return (f"invalid config: unknown key '{key}': nothing reads it (keys of {where}: "
                f"{', '.join(allowed)})")
    return f"invalid config: {key}={e['input']!r}: {e['msg']}"


def _is_branch_tag(part) -> bool:
    # pydantic names the union branch it tried ("int", "list[int]", "function-after[...]")
    return isinstance(part, str) and ("[" in part or part in ("int", "str", "float", "bool", "dict"))


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys the schema allows at `loc` (following sections, dicts of sections, optionals)."""
    ann: Any = schema
    for part in loc:
        ann = _unwrap(ann)
        if typing.get_origin(ann) is dict:
            ann = typing.get_args(ann)[1]  # `part` is a key of the mapping
            continue
        if not (inspect.isclass(ann) and issubclass(ann, BaseModel)) or part not in ann.model_fields:
            return []
        ann = ann.model_fields[part].annotation
    ann = _unwrap(ann)
    return list(ann.model_fields) if inspect.isclass(ann) and issubclass(ann, BaseModel) else []


def _unwrap(ann):
    """Annotated[X, ...] -> X; X | None -> X."""
    while True:
        if typing.get_origin(ann) is Annotated:
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
        else:
            return ann


def check_models(cfg: DictConfig) -> None:
    """Resolve every model spec now (the policy, the reference, each reward and self-reward
    node's `model`, composite components included), so a missing one fails first, by key."""
    from lsp.models import ModelUnavailableError, resolve_model

    specs = {"model.policy": cfg.model.policy, "model.reference": cfg.model.reference}
    specs |= _model_keys(OmegaConf.to_container(cfg.reward, resolve=True), "reward")
    if cfg.algo.self_reward.enabled:
        sr = OmegaConf.to_container(cfg.algo.self_reward, resolve=True)
        specs |= _model_keys(sr, "algo.self_reward")
    for key, value in specs.items():
        try:
            resolve_model(value, cfg.model.cache_dir)
        except ModelUnavailableError as err:
            raise ConfigError(f"{key}: {err}") from None


def _model_keys(node: dict, prefix: str) -> dict[str, str]:
    """`model` specs of a target node and of the target nodes nested in it, by full key."""
    found = {f"{prefix}.model": node["model"]} if node.get("model") and "_target_" in node else {}
    for key, sub in node.items():
        if isinstance(sub, dict):
            found |= _model_keys(sub, f"{prefix}.{key}")
    return found
