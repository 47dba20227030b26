"""The typed schema of every entry point's config, checked once at the boundary.

`validate(cfg, kind)` checks a composed config (train, select, evaluate, ifeval) against its
pydantic model: types, ranges, choices, cross-field rules and unknown keys, anywhere in the tree.
The first problem becomes one `ConfigError` line naming the key, the value and what is allowed.

A Hydra `_target_` node (reward, self-reward, optimiser, callbacks, strategies, judge) takes its
schema from its target: its keys must be parameters of the target's signature (unless it takes
**kwargs), parameters without a default must be given (except those the code passes itself, such
as the model pool), and annotated parameters are type-checked. Nested `_target_` nodes (a
composite reward's components) are checked the same way.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from lsp.errors import InputError
from lsp.selfplay.advantages import INVALID_QUERY_RULES
from lsp.selfplay.losses import AGGREGATIONS, KL_ESTIMATORS, KL_PLACEMENTS


class ConfigError(InputError):
    pass


# --------------------------------------------------------------------------- field types


def rule(ok, why: str) -> AfterValidator:
    """A constraint with our own one-line reason (pydantic's text for the type errors)."""

    def check(value):
        if not ok(value):
            raise PydanticCustomError("lsp_rule", why)
        return value

    return AfterValidator(check)


def choice(*options) -> Any:
    return Annotated[Any, rule(lambda v: v in options, f"expected one of {list(options)}")]


PosInt = Annotated[int, rule(lambda v: v >= 1, "must be >= 1")]
NonNegInt = Annotated[int, rule(lambda v: v >= 0, "must be >= 0")]
PosFloat = Annotated[float, rule(lambda v: v > 0, "must be > 0")]
NonNegFloat = Annotated[float, rule(lambda v: v >= 0, "must be >= 0")]
Name = Annotated[str, rule(lambda v: bool(v.strip()), "must be a non-empty string")]
Temperature = Annotated[float, rule(lambda v: v > 0, "must be > 0")]
TopP = Annotated[float, rule(lambda v: 0 < v <= 1, "must be in (0, 1]")]
Engine = choice("lsp", "hf", "vllm")
Dtype = choice("float32", "bfloat16")
Amp = choice("auto", "bfloat16", "none")

ON_POLICY = ("the trained roles must sample from the distribution their log-probs are taken "
             "under (logits / temperature): use top_p=1.0 and top_k=0 (temperature may vary)")
# Training and reference log-probs (so the gradient and the KL) are taken under logits /
# temperature; a truncating sampler would make them those of another distribution (off-policy),
# and pi_ref may give a sampled token probability 0 there (an infinite KL). So the trained roles
# sample untruncated, at any temperature.
OnPolicyTopP = Annotated[TopP, rule(lambda v: v == 1.0, ON_POLICY)]
OnPolicyTopK = Annotated[NonNegInt, rule(lambda v: v == 0, ON_POLICY)]

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def target_node(*injected: str) -> Any:
    """A `_target_` node whose schema is its target's signature; `injected`: parameters the code
    passes itself (never in the config)."""
    return Annotated[dict, AfterValidator(lambda node: _check_target(node, set(injected)))]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- shared sections


class ModelSection(Section):
    policy: Name
    reference: Name
    dtype: Dtype
    reference_dtype: choice("float32", "bfloat16", "float16")
    amp: Amp
    cache_dir: str | None = None
    gradient_checkpointing: bool
    attn_implementation: choice("auto", "grouped", "sdpa", "eager")
    share_prefix: bool
    chat_date: Annotated[str, rule(lambda v: bool(v.strip()), "the date chat templates see: a "
                                   "non-empty string such as '26 Jul 2024'")]


class LoggerSection(Section):
    experiment_name: Name
    tracking_uri: Name
    artifact_location: str | None = None
    run_name: str | None = None
    retry_every_s: NonNegFloat = 30.0  # training (lsp.tracking)
    tags: dict[str, str] | None = None  # added to every run (a study's: lsp.study.params.study_logger)
    parent_run_id: str | None = None    # the runs nest under it (a study arm's parent run)


class GenerationSection(Section):
    """Evaluation and selection answers (lsp.evaluation.outputs.GenerationSettings)."""

    # temperature 0 would divide the logits by zero; top_p 0 keeps no token at all
    temperature: Temperature
    top_p: TopP
    max_new_tokens: PosInt
    batch_size: PosInt
    dtype: Dtype
    amp: Amp
    engine: Engine


# --------------------------------------------------------------------------- train


class SamplingSection(Section):
    max_new_tokens: PosInt
    temperature: Temperature
    top_p: OnPolicyTopP
    top_k: OnPolicyTopK
    batch_size: PosInt
    engine: Engine


class VLLMSection(Section):
    dtype: choice("auto", "float32", "bfloat16", "float16")
    enforce_eager: bool
    max_model_len: Annotated[int, rule(lambda v: v >= 16, "must be >= 16 tokens")]
    kv_cache_gb: Annotated[int, rule(lambda v: v >= 1, "must be >= 1 (GiB)")]
    gpu_memory_utilization: Annotated[float, rule(lambda v: 0 < v <= 1, "must be in (0, 1]")]
    cpu_prefill_tokens: PosInt = 16384


class ConstraintsSection(Section):
    k: PosInt
    held_out: list[str] | None = None


class RolloutSection(Section):
    num_queries: Annotated[int, rule(lambda v: v >= 1, "need at least one query per step")]
    group_size: Annotated[int, rule(lambda v: v >= 2, "the Solver's group-mean baseline needs at "
                                    "least 2 answers per query")]
    task: str | None = None
    template: str | None = None
    prompt_file: str | None = None
    max_query_chars: PosInt
    reject_truncated: bool
    challenger: SamplingSection
    solver: SamplingSection
    vllm: VLLMSection
    constraints: ConstraintsSection


class AlgoSection(Section):
    name: Name
    beta: Annotated[float, rule(lambda v: v >= 0, "the KL weight must be >= 0")]
    kl_estimator: choice(*KL_ESTIMATORS)
    kl_placement: choice(*KL_PLACEMENTS)
    aggregation: choice(*AGGREGATIONS)
    alpha_ch: Annotated[float, rule(lambda v: v >= 0, "the Challenger loss weight must be >= 0")]
    scale_std: bool
    invalid_query: choice(*INVALID_QUERY_RULES)
    # enabled and weight are ours; the rest is the self-reward's _target_ node
    self_reward: dict


def _optim(node: dict) -> dict:
    """The optimiser node: its class's signature, plus a positive lr (torch would raise later)."""
    lr = node.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise _key_error("lr", f"={lr!r}: the learning rate must be > 0")
    _check_target(node, {"params"})
    _build_optimizer(node)
    return node


def _build_optimizer(node: dict) -> None:
    """Build the optimiser over one dummy parameter: torch checks its own arguments (betas,
    eps, ...) here, at the boundary, rather than inside the first training step."""
    import torch
    from hydra._internal.utils import _locate

    kwargs = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    try:
        _locate(node["_target_"])([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise _key_error("_target_", f"={node['_target_']!r} refuses its settings: {err}") from None


OptimNode = Annotated[dict, AfterValidator(_optim)]


def _devices_ok(v) -> bool:
    if isinstance(v, int):
        return v >= 1 or v == -1
    if isinstance(v, list):
        return bool(v) and all(isinstance(i, int) and i >= 0 for i in v)
    parts = [x.strip() for x in v.split(",") if x.strip()]
    return v in ("auto", "-1") or bool(parts) and all(x.isdigit() for x in parts)


Device = Annotated[str, rule(lambda v: v in ("auto", "cpu", "mps") or v == "cuda"
                             or (v.startswith("cuda:") and v[5:].isdigit()),
                             "expected auto, cpu, cuda, cuda:<index> or mps")]


class TrainerSection(Section):
    max_steps: PosInt
    micro_batch_size: PosInt
    grad_clip: PosFloat | None = None
    max_nonfinite_steps: NonNegInt
    accelerator: choice("auto", "cpu", "cuda", "gpu", "mps")
    devices: Annotated[int | str | list[int], rule(_devices_ok, "expected a count >= 1, -1, "
                                                  "'auto', a list of ids or '0,1'")]
    num_nodes: PosInt
    strategy: Name
    strategies: dict[str, target_node()]
    # mixed precision is model.amp (lsp.models.autocast: the rollout and log-prob passes too);
    # Lightning's *-mixed plugins would autocast only part of the step
    precision: choice("32-true", "32", "bf16-true", "16-true")
    log_every_n_steps: PosInt


class TrainConfig(Section):
    model: ModelSection
    reward: target_node("pool")
    algo: AlgoSection
    rollout: RolloutSection
    optim: OptimNode
    trainer: TrainerSection
    logger: LoggerSection
    callbacks: dict[str, target_node() | None]
    name: Name
    run_dir: str | None = None
    resume: bool
    seed: int
    device: Device
    sweep_id: str | int | None = None


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


def _typed(value, kind, key: str):
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {key}={value!r}: {err.errors()[0]['msg']}") from None


# --------------------------------------------------------------------------- select / evaluate / ifeval


class CandidateSection(Section):
    model: Name
    name: str | None = None
    selection: str | None = None


class BaseSection(Section):
    model: Name
    name: Name


class SelectConfig(Section):
    model: ModelSection
    reward: target_node("pool")
    logger: LoggerSection | None = None
    run_dir: Name
    out_dir: Name
    metrics_file: str | None = None  # the headline figures (lsp.study.headline); default out_dir/metrics.json
    reward_from_run: bool
    validation_prompts: str | None = None
    include_base: bool
    generation: GenerationSection
    device: Device
    seed: int


class EvalSetSection(Section):
    path: Name


class SubsetSection(Section):
    k_per_subset: PosInt | None = None
    seed: int


class SanitySection(Section):
    enabled: bool
    n_pairs: PosInt
    seed: int
    strong_path: Name
    weak_path: Name


class EvalSection(Section):
    eval_set: EvalSetSection
    subset: SubsetSection
    generation: GenerationSection
    baselines: list[choice("base", "reference")]
    length_controlled: bool
    sanity: SanitySection
    judge: target_node()


class CandidateVsBase(Section):
    """What lsp.evaluate and lsp.ifeval share: a candidate model scored against the base."""

    model: ModelSection
    logger: LoggerSection | None = None
    candidate: CandidateSection
    base: BaseSection
    out_dir: Name
    metrics_file: str | None = None  # the headline figures (lsp.study.headline); default: in out_dir
    device: Device
    model_cache_dir: str | None = None
    seed: int


class EvaluateConfig(CandidateVsBase):
    eval: EvalSection
    generations_dir: str | None = None


class IFEvalSection(Section):
    path: Name
    limit: PosInt | None = None
    max_new_tokens: PosInt
    n_boot: PosInt
    held_out: list[str] | None = None


class IFEvalEvalSection(Section):
    """lsp.ifeval reads eval.generation (the AlpacaEval answers' settings); the rest of conf/eval
    comes with the group and is checked, not read."""

    generation: GenerationSection
    eval_set: EvalSetSection | None = None
    subset: SubsetSection | None = None
    baselines: list[choice("base", "reference")] | None = None
    length_controlled: bool | None = None
    sanity: SanitySection | None = None


class IFEvalConfig(CandidateVsBase):
    eval: IFEvalEvalSection
    ifeval: IFEvalSection


# --------------------------------------------------------------------------- the study (params.yaml)


class ArmSection(Section):
    """An arm of the DVC study (lsp.study.params.train_config): its algo, start, queries, and optional
    per-arm overrides of a training section (checked with the arm's whole train config)."""

    algo: dict
    init: Name
    queries: Name
    model: dict | None = None
    reward: dict | None = None
    rollout: dict | None = None
    optim: dict | None = None
    trainer: dict | None = None
    callbacks: dict | None = None
    seed: int | None = None


class PromptSetSection(Section):
    path: Name


class StudySelectSection(Section):
    include_base: bool
    generation: GenerationSection


class StudyParams(Section):
    """params.yaml: the training sections every arm shares, the arms, and each stage's section.
    Each stage also checks the config it derives (train, select, evaluate, ifeval)."""

    model: ModelSection
    reward: target_node("pool")
    rollout: RolloutSection
    optim: OptimNode
    trainer: TrainerSection
    logger: LoggerSection
    callbacks: dict[str, target_node() | None]
    arms: Annotated[dict[str, ArmSection], rule(bool, "a study needs at least one arm")]
    prompt_sets: dict[str, PromptSetSection]
    eval: EvalSection
    algo: dict[str, Any]  # study-wide algo knobs the arms interpolate (e.g. beta)
    grpo_prompt_file: str | None = None
    seed: int
    device: Device
    model_cache_dir: str | None = None
    select: StudySelectSection
    ifeval: IFEvalSection
    report: dict[str, str]
    study_name: Name


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


def _check_target(node: dict, injected: set[str], prefix: str = "") -> dict:
    """Check a `_target_` node against its target's signature (module doc)."""
    from hydra._internal.utils import _locate  # hydra.utils.get_object, without its error log

    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        raise _key_error(f"{prefix}_target_", f"={target!r}: must name a class or function")
    try:
        obj = _locate(target)
    except Exception as err:  # ImportError, AttributeError, ...: the first line of Hydra's text
        why = " ".join(str(err).split())
        raise _key_error(f"{prefix}_target_", f"={target!r}: cannot be imported ({why})") from None
    params, open_kwargs, hints = _signature(obj)
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key not in params and not open_kwargs:
            raise _key_error(f"{prefix}{key}", f": unknown key for {target} (its parameters: "
                                               f"{', '.join(p for p in params if p not in injected)})")
        if isinstance(value, dict):
            _check_nested(value, f"{prefix}{key}.")
        elif key in hints:
            _check_type(value, hints[key], f"{prefix}{key}")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in node and p.name not in injected]
    if missing and not node.get("_partial_"):
        raise _key_error(f"{prefix}{missing[0]}", f": missing: {target} needs it")
    return node


def _check_nested(value: dict, prefix: str) -> None:
    """A dict inside a target node: another target node, or a mapping that may hold some."""
    if "_target_" in value:
        _check_target(value, {"pool"}, prefix)
        return
    for key, sub in value.items():
        if isinstance(sub, dict):
            _check_nested(sub, f"{prefix}{key}.")


def _signature(obj) -> tuple[dict, bool, dict]:
    """(named parameters, whether **kwargs are open, resolvable annotations) of a callable; a
    class that forwards **kwargs to its base takes the base's parameters too."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict = {}
    chain = [c for c in inspect.getmro(obj) if c is not object] if inspect.isclass(obj) else [obj]
    for item in chain:
        fn = item.__init__ if inspect.isclass(item) else item
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, True, hints
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, p)
        try:
            for name, ann in typing.get_type_hints(fn, include_extras=True).items():
                hints.setdefault(name, ann)
        except Exception:  # unresolvable annotations (forward refs): no type check for them
            pass
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, False, hints
        if not inspect.isclass(obj):
            break
    return params, True, hints


def _check_type(value, annotation, key: str) -> None:
    try:
        adapter = TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot check (a tensor, a module): skipped
        return
    try:
        adapter.validate_python(value)
    except ValidationError as err:
        raise _key_error(key, f"={value!r}: {err.errors()[0]['msg']}") from None


def _key_error(key: str, text: str) -> PydanticCustomError:
    return PydanticCustomError("lsp_key", "{text}", {"key": key, "text": text})


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
