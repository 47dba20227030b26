"""The pydantic sections of every entry point's config (train, select, evaluate, ifeval) and of
the study's params.yaml; `lsp.config.validate` checks a composed config against them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from lsp.config.checks import (
    HYDRA_KEYS,
    Amp,
    Dtype,
    Engine,
    Name,
    NonNegFloat,
    NonNegInt,
    OnPolicyTopK,
    OnPolicyTopP,
    PosFloat,
    PosInt,
    Temperature,
    TopP,
    _check_target,
    _key_error,
    choice,
    rule,
    target_node,
)
from lsp.selfplay.advantages import INVALID_QUERY_RULES
from lsp.selfplay.losses import AGGREGATIONS, KL_ESTIMATORS, KL_PLACEMENTS


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
    fused_lm_head: bool = True
    reference_prompt_memo: bool = True
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
    kv_cache_gb: Annotated[float, rule(lambda v: v > 0, "must be > 0 (GiB)")]
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
    group_by_length: bool = True  # lsp.selfplay.passes.role_batches
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
    # CPU runs: glibc malloc settings (lsp.selfplay.runtime.configure_cpu_allocator)
    cpu_allocator: choice("heap", "keep", "system") = "heap"


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
    metrics_file: str | None = None  # the headline figures (lsp.headline); default out_dir/metrics.json
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
    metrics_file: str | None = None  # the headline figures (lsp.headline); default: in out_dir
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
