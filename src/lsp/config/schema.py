"""The pydantic sections of every entry point's config (train, select, evaluate, ifeval) and of
the study's params.yaml; `lsp.config.validate` checks a composed config against them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

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
from lsp.selfplay.advantages import INVALID_QUERY_RULES, MARGIN_SCALES
from lsp.selfplay.losses import AGGREGATIONS, ENGINE_CORRECTIONS, KL_ESTIMATORS, KL_PLACEMENTS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- shared sections


class LoRASection(Section):
    """`model.lora` (lsp.lora, docs/gpu.md): the policy trains low-rank adapters instead of every
    weight."""

    r: NonNegInt = Field(0, description="Adapter rank; 0: LoRA off (full fine-tuning), N > 0: on.")
    alpha: PosFloat = Field(32.0, description="LoRA scaling numerator: the update is (alpha / r) B A.")
    dropout: Annotated[float, rule(lambda v: 0 <= v < 1, "must be in [0, 1)")] = Field(0.0, description="Dropout on the adapters' input (training passes only; 0 keeps the engine's and the policy's distributions equal).")
    target_modules: Annotated[list[str], rule(lambda v: bool(v) and not {"lm_head", "embed_tokens"} & set(v), "a non-empty list of linear layer names, without lm_head or embed_tokens (tied to each other in the models here)")] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], description="The linear layers that get adapters (names as in the model, e.g. q_proj).")


class ModelSection(Section):
    policy: Name = Field(description="The trained policy: a hub id, a local folder, `embedded:<name>` or `tiny:<name>` (lsp.models).")
    reference: Name = Field(description="pi_ref, the frozen KL anchor and self-reward judge (default: a copy of the initial policy).")
    dtype: Dtype = Field(description="Precision of the policy's master weights and optimiser state.")
    reference_dtype: choice("float32", "bfloat16", "float16") = Field(description="Precision of the frozen models (reference, judges); float32 keeps the KL at 0 at step 0.")
    amp: Amp = Field(description="Autocast for generation and forward passes: auto (bf16 where the CPU/GPU has it), bfloat16, none.")
    cache_dir: str | None = Field(None, description="Where converted and tiny models are kept (null: ~/.cache/lsp/models or LSP_MODEL_CACHE).")
    gradient_checkpointing: bool = Field(description="Recompute activations in the backward pass: less memory, more compute.")
    attn_implementation: choice("auto", "grouped", "sdpa", "eager") = Field(description="Attention kernel: auto (grouped-query attention on CPU, SDPA elsewhere), grouped, sdpa, eager.")
    share_prefix: bool = Field(description="One prompt pass per distinct prompt in the log-prob passes (same maths, less work).")
    fused_lm_head: bool = Field(True, description="LM head and log-softmax one vocabulary slice at a time, real tokens only (same maths).")
    reference_prompt_memo: bool = Field(True, description="Run pi_ref over the Challenger's fixed prompt once per run, not per step (same numbers).")
    chat_date: Annotated[str, rule(lambda v: bool(v.strip()), "the date chat templates see: a "
                                   "non-empty string such as '26 Jul 2024'")] = Field(description="The date every chat template sees, so a prompt renders the same on any day (lsp.chat).")
    lora: LoRASection = Field(default_factory=lambda: LoRASection(), description="LoRA adapters on the policy (lsp.lora; r=0: off, full fine-tuning). On, the reference and a self-reward judge naming the policy are the same model with its adapters disabled.")


class LoggerSection(Section):
    experiment_name: Name = Field(description="MLflow experiment the runs go to.")
    tracking_uri: Name = Field(description="MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
    artifact_location: str | None = Field(None, description="Artifact folder, used when the experiment is created (relative to the working directory).")
    run_name: str | None = Field(None, description="MLflow run name (null: the config's name).")
    retry_every_s: NonNegFloat = Field(30.0, description="Training: while the store does not answer, metrics are queued and retried this often (seconds).")  # training (lsp.tracking)
    tags: dict[str, str] | None = Field(None, description="Tags added to every run (a study's: study, arm, DVC experiment, commit).")  # added to every run (a study's: lsp.study.params.study_logger)
    parent_run_id: str | None = Field(None, description="The runs nest under this MLflow run (a study: each arm's parent run).")  # the runs nest under it (a study arm's parent run)


class GenerationSection(Section):
    """Evaluation and selection answers (lsp.evaluation.outputs.GenerationSettings)."""

    # temperature 0 would divide the logits by zero; top_p 0 keeps no token at all
    temperature: Temperature = Field(description="Sampling temperature of the answers (the paper: 0.01).")
    top_p: TopP = Field(description="Nucleus sampling threshold, in (0, 1].")
    max_new_tokens: PosInt = Field(description="Longest answer, in tokens.")
    batch_size: PosInt = Field(description="Prompts generated together.")
    dtype: Dtype = Field(description="Precision of the answering model's weights.")
    amp: Amp = Field(description="Autocast for generation: auto, bfloat16 or none.")
    engine: Engine = Field(description="Generation engine: lsp (own KV-cache loop), hf (model.generate) or vllm (lsp.engines).")


# --------------------------------------------------------------------------- train


class SamplingSection(Section):
    max_new_tokens: PosInt = Field(description="Longest completion of this role, in tokens.")
    temperature: Temperature = Field(description="Sampling temperature; log-probs and the KL are taken under the same temperature.")
    top_p: OnPolicyTopP = Field(description="Must be 1.0: the trained roles sample the untruncated distribution (on-policy).")
    top_k: OnPolicyTopK = Field(description="Must be 0: the trained roles sample the untruncated distribution (on-policy).")
    batch_size: PosInt = Field(description="Sequences generated together.")
    engine: Engine = Field(description="Generation engine of this role: lsp, hf or vllm (lsp.engines).")


class VLLMSection(Section):
    dtype: choice("auto", "float32", "bfloat16", "float16") = Field(description="vLLM engine precision (auto: bfloat16 where training autocasts to bf16, else the model's).")
    enforce_eager: bool = Field(description="No compiled graphs: starts in seconds, decodes slower.")
    max_model_len: Annotated[StrictInt, rule(lambda v: v >= 16, "must be >= 16 tokens")] = Field(description="Prompt + completion tokens per sequence the engine holds.")
    kv_cache_gb: Annotated[float, rule(lambda v: v > 0, "must be > 0 (GiB)")] = Field(description="CPU: KV-cache memory in GiB, resident from the start.")
    gpu_memory_utilization: Annotated[float, rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = Field(description="CUDA: share of the whole GPU per engine.")
    cpu_prefill_tokens: PosInt = Field(16384, description="CPU: prompt tokens per engine step; prompts go in groups that fit.")


class ConstraintsSection(Section):
    k: PosInt = Field(description="Verifiable IFEval-registry instructions appended to each valid query (reward=constraints, judge_constraints).")
    held_out: list[str] | None = Field(None, description="Constraint types never drawn in training (null: lsp.selfplay.constraints.HELD_OUT_TYPES, 8 of 25).")


class CanarySection(Section):
    """`rollout.canary` (lsp.engines.canary): warn and count when the engine's log-probs drift
    from the policy's."""

    max_gap_ratio: Annotated[float, rule(lambda v: v > 1, "must be > 1")] = Field(5.0, description="Alert when rollout/logprob_gap exceeds this multiple of its first step's value (its floor: the engine's precision).")
    min_gap: PosFloat = Field(0.01, description="...and exceeds this absolute gap (nats per token), so that a floor of about 0 (an fp32 engine) does not alert on noise.")


class RolloutSection(Section):
    num_queries: Annotated[StrictInt, rule(lambda v: v >= 1, "need at least one query per step")] = Field(description="N: Challenger queries per step, the global count over all processes.")
    group_size: Annotated[StrictInt, rule(lambda v: v >= 2, "the Solver's group-mean baseline needs at "
                                    "least 2 answers per query")] = Field(description="G: Solver answers per query (>= 2 for the group-mean baseline).")
    task: str | None = Field(None, description="The Challenger prompt's {task} (null: lsp.selfplay.prompts.DEFAULT_TASK).")
    template: str | None = Field(None, description="The Challenger prompt's {template} (null: lsp.selfplay.prompts.DEFAULT_TEMPLATE).")
    prompt_file: str | None = Field(None, description="Instructions file (JSON/JSONL/text): queries come from it, no Challenger (algo=grpo only).")
    max_query_chars: PosInt = Field(description="A longer Challenger query is degenerate (not sent to the Solver).")
    reject_truncated: bool = Field(description="A query cut off by max_new_tokens is degenerate.")
    challenger: SamplingSection = Field(description="Sampling of the Challenger's queries.")
    solver: SamplingSection = Field(description="Sampling of the Solver's answers.")
    vllm: VLLMSection = Field(description="Every vLLM engine of the run (in process, colocated with training).")
    constraints: ConstraintsSection = Field(description="The constraint environment, on when the reward scores constraints.")
    canary: CanarySection = Field(default_factory=lambda: CanarySection(), description="The stale-weights alarm on rollout/logprob_gap (lsp.engines.canary).")


class AlgoSection(Section):
    name: Name = Field(description="Algorithm name: lsp, lsp_zero or grpo (names the run and its outputs).")
    beta: Annotated[float, rule(lambda v: v >= 0, "the KL weight must be >= 0")] = Field(description="KL weight to the reference, both roles (paper: 0.05).")
    kl_estimator: choice(*KL_ESTIMATORS) = Field(description="KL estimator: k1 (sampled log-ratio, paper), k2 or k3 (k2/k3 only with kl_placement=loss).")
    kl_placement: choice(*KL_PLACEMENTS) = Field(description="reward: detached per-token penalty in the advantage (exact KL gradient); loss: the paper's formula as written.")
    aggregation: choice(*AGGREGATIONS) = Field(description="Loss aggregation: seq_sum (paper), token_mean or seq_mean.")
    alpha_ch: Annotated[float, rule(lambda v: v >= 0, "the Challenger loss weight must be >= 0")] = Field(description="Weight of the Challenger's loss (paper silent: 1.0).")
    scale_std: bool = Field(description="Divide advantages by the group std (paper: no).")
    invalid_query: choice(*INVALID_QUERY_RULES) = Field(description="Degenerate queries: penalize (lowest valid Challenger reward minus the margin) or skip.")
    invalid_margin: Annotated[float, rule(lambda v: v >= 0, "the invalid-query margin must be >= 0")] = Field(description="penalize: how far below the worst valid query an invalid one sits, in units of invalid_margin_scale.")
    invalid_margin_scale: choice(*MARGIN_SCALES) = Field(description="spread: the margin is in units of the step's valid Solver reward std (default); absolute: in reward units (the rule before issue 35).")
    # enabled and weight are ours; the rest is the self-reward's _target_ node
    self_reward: dict = Field(description="The quality self-reward R_Q: enabled, weight, and its _target_ node (lsp.selfplay.rewards.QualitySelfReward).")
    engine_correction: choice(*ENGINE_CORRECTIONS) = Field("none", description="Correction for the engine sampling a slightly different distribution than the policy trains (lsp.selfplay.losses.engine_weights): none, tis (truncated sequence importance weights, exact when the cap covers every ratio) or tis_token (TRL's per-token weights).")
    tis_cap: Annotated[float, rule(lambda v: v >= 1, "must be >= 1 (a cap below 1 shrinks every on-policy term)")] = Field(2.0, description="Truncation of the engine-correction weights (TRL's vllm_importance_sampling_cap).")


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
    max_steps: PosInt = Field(description="Self-play steps (optimiser updates) of the run.")
    micro_batch_size: PosInt = Field(description="Sequences per forward/backward pass (gradient accumulation over the step).")
    group_by_length: bool = Field(True, description="Micro-batches of rows of similar completion length: fewer padded tokens (same sums).")  # lsp.selfplay.passes.role_batches
    grad_clip: PosFloat | None = Field(None, description="Maximum global gradient norm (null: no clipping).")
    max_nonfinite_steps: NonNegInt = Field(description="Consecutive NaN/inf steps (skipped) before the run stops.")
    accelerator: choice("auto", "cpu", "cuda", "gpu", "mps") = Field(description="Lightning accelerator: auto, cpu, cuda, gpu or mps.")
    devices: Annotated[StrictInt | str | list[StrictInt], rule(_devices_ok, "expected a count >= 1, -1, "
                                                  "'auto', a list of ids or '0,1'")] = Field(description="Processes per node: a count, -1, 'auto', a list of ids or '0,1'.")
    num_nodes: PosInt = Field(description="Machines; processes = devices x num_nodes.")
    strategy: Name = Field(description="auto (one process, or ddp when several) or a key of trainer.strategies.")
    strategies: dict[str, target_node()] = Field(description="The strategies by name (_target_ nodes): ddp (SelfPlayDDP), fsdp (SelfPlayFSDP).")
    # mixed precision is model.amp (lsp.models.autocast: the rollout and log-prob passes too);
    # Lightning's *-mixed plugins would autocast only part of the step
    precision: choice("32-true", "32", "bf16-true", "16-true") = Field(description="Lightning precision of the weights; mixed precision is model.amp.")
    log_every_n_steps: PosInt = Field(description="Lightning's logging interval in steps.")
    # CPU runs: glibc malloc settings (lsp.selfplay.runtime.configure_cpu_allocator)
    cpu_allocator: choice("heap", "keep", "system") = Field("heap", description="CPU runs, glibc malloc: heap (default), keep or system (lsp.selfplay.runtime).")


class TrainConfig(Section):
    model: ModelSection = Field(description="Policy, reference and precision (conf/model/).")
    reward: target_node("pool") = Field(description="The reward source, a _target_ node (conf/reward/).")
    algo: AlgoSection = Field(description="The self-play algorithm (conf/algo/).")
    rollout: RolloutSection = Field(description="Sampling of both roles (conf/rollout/).")
    optim: OptimNode = Field(description="The optimiser, a _target_ node with lr > 0 (conf/optim/).")
    trainer: TrainerSection = Field(description="Lightning Trainer, processes and precision (conf/trainer/).")
    logger: LoggerSection = Field(description="MLflow tracking (conf/logger/).")
    callbacks: dict[str, target_node() | None] = Field(description="Callbacks by name, each a _target_ node or null (conf/callbacks/).")
    name: Name = Field(description="Run name: runs live under outputs/<name>/<timestamp>/.")
    run_dir: str | None = Field(None, description="Fixed output folder (DVC stages set it); null: Hydra's run folder.")
    resume: bool = Field(description="Continue the newest run of <name> (or run_dir) from its last checkpoint.")
    seed: StrictInt = Field(description="Random seed (rank 0's; each rank derives its own stream).")
    device: Device = Field(description="auto (cuda when available, else cpu), cpu, cuda, cuda:<index> or mps.")
    sweep_id: str | StrictInt | None = Field(None, description="MLflow tag grouping a sweep's runs; multirun sets it to the sweep folder's name.")


# --------------------------------------------------------------------------- select / evaluate / ifeval


class CandidateSection(Section):
    model: Name = Field(description="The model scored: hub id, folder, checkpoint folder, embedded:..., tiny:...")
    name: str | None = Field(None, description="Generator name in the outputs (null: derived from the path).")
    selection: str | None = Field(None, description="A selection.json from `python -m lsp.select`: use its chosen checkpoint.")


class BaseSection(Section):
    model: Name = Field(description="The base model the candidate is compared with (the paper: the initial model).")
    name: Name = Field(description="The base's generator name.")


class SelectConfig(Section):
    model: ModelSection = Field(description="The base model (include_base) and precision settings.")
    reward: target_node("pool") = Field(description="The reward checkpoints are scored with (replaced by the run's own when reward_from_run).")
    logger: LoggerSection | None = Field(None, description="MLflow tracking.")
    run_dir: Name = Field(description="The training run folder holding checkpoints/step_XXXXXX/.")
    out_dir: Name = Field(description="Output folder: selection.json and the answers.")
    metrics_file: str | None = Field(None, description="The headline figures' file (null: out_dir/metrics.json).")  # the headline figures (lsp.headline); default out_dir/metrics.json
    reward_from_run: bool = Field(description="Use the training run's saved reward config when it has one.")
    validation_prompts: str | None = Field(None, description="Validation prompts file (null: the packaged validation_prompts.json).")
    include_base: bool = Field(description="Also score the base model (model.policy) as step 0.")
    generation: GenerationSection = Field(description="Sampling of the Solver answers scored.")
    device: Device = Field(description="auto, cpu, cuda, cuda:<index> or mps.")
    seed: StrictInt = Field(description="Random seed.")


class EvalSetSection(Section):
    path: Name = Field(description="AlpacaEval JSON (instruction, output, generator, dataset); null: alpaca-eval's hub loader.")


class SubsetSection(Section):
    k_per_subset: PosInt | None = Field(None, description="k instructions per AlpacaEval subset, stratified (null: all 805).")
    seed: StrictInt = Field(description="Seed of the stratified sample.")


class SanitySection(Section):
    enabled: bool = Field(description="Run the judge sanity checks with every evaluation.")
    n_pairs: PosInt = Field(description="Pairs per sanity check (known preference; matched vs mismatched).")
    seed: StrictInt = Field(description="Seed of the sanity pairs.")
    strong_path: Name = Field(description="Outputs of the stronger model in the known-preference pairs (AlpacaEval 2.0 references).")
    weak_path: Name = Field(description="Outputs of the weaker model in the known-preference pairs (text-davinci-003).")


class EvalSection(Section):
    eval_set: EvalSetSection = Field(description="The AlpacaEval instructions and reference outputs.")
    subset: SubsetSection = Field(description="A stratified sample of the eval set (quick runs).")
    generation: GenerationSection = Field(description="Sampling of the evaluated answers (the paper: temperature 0.01).")
    baselines: list[choice("base", "reference")] = Field(description="What the candidate is judged against: base (the paper) and/or reference (the leaderboard).")
    length_controlled: bool = Field(description="Report alpaca-eval's length-controlled win rate where its hub data is reachable.")
    sanity: SanitySection = Field(description="The judge's sanity checks.")
    judge: target_node() = Field(description="The pairwise judge, a _target_ node (conf/eval/judge/).")


class CandidateVsBase(Section):
    """What lsp.evaluate and lsp.ifeval share: a candidate model scored against the base."""

    model: ModelSection = Field(description="The base model (model.policy) and precision settings.")
    logger: LoggerSection | None = Field(None, description="MLflow tracking.")
    candidate: CandidateSection = Field(description="The model evaluated.")
    base: BaseSection = Field(description="The model it is compared with.")
    out_dir: Name = Field(description="Output folder of the figures, records and generations.")
    metrics_file: str | None = Field(None, description="The headline figures' file (null: in out_dir).")  # the headline figures (lsp.headline); default: in out_dir
    device: Device = Field(description="auto, cpu, cuda, cuda:<index> or mps.")
    model_cache_dir: str | None = Field(None, description="Where converted and tiny models are kept (null: the default cache).")
    seed: StrictInt = Field(description="Random seed.")


class EvaluateConfig(CandidateVsBase):
    eval: EvalSection = Field(description="AlpacaEval settings (conf/eval/).")
    generations_dir: str | None = Field(None, description="Resumable generation store (null: out_dir/generations).")


class IFEvalSection(Section):
    path: Name = Field(description="IFEval prompts (JSONL); null: the hub's google/IFEval.")
    limit: PosInt | None = Field(None, description="Only the first n prompts (null: all 541).")
    max_new_tokens: PosInt = Field(description="Longest IFEval answer, in tokens (n_truncated counts the answers that hit it).")
    n_boot: PosInt = Field(description="Bootstrap resamples of the paired difference.")
    held_out: list[str] | None = Field(None, description="Types training never draws, for the seen vs held-out split (null: HELD_OUT_TYPES).")


class IFEvalEvalSection(Section):
    """lsp.ifeval reads eval.generation (the AlpacaEval answers' settings); the rest of conf/eval
    comes with the group and is checked, not read."""

    generation: GenerationSection = Field(description="Sampling of the IFEval answers (shared with AlpacaEval).")
    eval_set: EvalSetSection | None = Field(None, description="Comes with conf/eval; checked, not read.")
    subset: SubsetSection | None = Field(None, description="Comes with conf/eval; checked, not read.")
    baselines: list[choice("base", "reference")] | None = Field(None, description="Comes with conf/eval; checked, not read.")
    length_controlled: bool | None = Field(None, description="Comes with conf/eval; checked, not read.")
    sanity: SanitySection | None = Field(None, description="Comes with conf/eval; checked, not read.")


class IFEvalConfig(CandidateVsBase):
    eval: IFEvalEvalSection = Field(description="The generation settings (eval.generation).")
    ifeval: IFEvalSection = Field(description="IFEval settings.")


# --------------------------------------------------------------------------- the study (params.yaml)


class ArmSection(Section):
    """An arm of the DVC study (lsp.study.params.train_config): its algo, start, queries, and optional
    per-arm overrides of a training section (checked with the arm's whole train config)."""

    algo: dict = Field(description="The arm's algo group and overrides (e.g. beta).")
    queries: Name = Field(description="Where its queries come from: challenger (self-play) or the name of a prompt set (a data arm).")
    model: dict | None = Field(None, description="Per-arm overrides of the model section.")
    reward: dict | None = Field(None, description="Per-arm overrides of the reward.")
    rollout: dict | None = Field(None, description="Per-arm overrides of the rollout section.")
    optim: dict | None = Field(None, description="Per-arm overrides of the optimiser (e.g. arms.grpo.optim.lr).")
    trainer: dict | None = Field(None, description="Per-arm overrides of the trainer section.")
    callbacks: dict | None = Field(None, description="Per-arm overrides of the callbacks.")


class PromptSetSection(Section):
    path: Name = Field(description="The prompt set's file.")


class StudySelectSection(Section):
    include_base: bool = Field(description="Also score the base model as step 0.")
    generation: GenerationSection = Field(description="Sampling of the answers scored for selection.")


class StudyParams(Section):
    """params.yaml: the training sections every arm shares, the arms, and each stage's section.
    Each stage also checks the config it derives (train, select, evaluate, ifeval)."""

    model: ModelSection = Field(description="Policy, reference and precision shared by the arms.")
    reward: target_node("pool") = Field(description="The training reward shared by the arms (a _target_ node).")
    rollout: RolloutSection = Field(description="Sampling shared by the arms.")
    optim: OptimNode = Field(description="The optimiser shared by the arms.")
    trainer: TrainerSection = Field(description="The trainer shared by the arms.")
    logger: LoggerSection = Field(description="MLflow tracking of every stage.")
    callbacks: dict[str, target_node() | None] = Field(description="Training callbacks shared by the arms.")
    arms: Annotated[dict[str, ArmSection], rule(bool, "a study needs at least one arm")] = Field(description="The trained arms by name (at least one).")
    prompt_sets: dict[str, PromptSetSection] = Field(description="Prompt sets by name (the GRPO arms' instructions).")
    eval: EvalSection = Field(description="AlpacaEval settings of the study.")
    algo: dict[str, Any] = Field(description="Study-wide algo knobs the arms interpolate (e.g. beta).")  # study-wide algo knobs the arms interpolate (e.g. beta)
    grpo_prompt_file: str | None = Field(None, description="The data control arm's instruction file (prompt_sets.grpo).")
    seeds: Annotated[list[StrictInt], rule(lambda v: bool(v) and len(set(v)) == len(v), "a non-empty list of distinct seeds")] = Field(description="The seeds every arm is trained and evaluated with, and the base evaluated with (one DVC stage per arm x seed).")
    seed: StrictInt = Field(description="The seed of data draws shared by every run (the validation prompts' constraints).")
    device: Device = Field(description="auto, cpu, cuda, cuda:<index> or mps.")
    model_cache_dir: str | None = Field(None, description="Where converted and tiny models are kept.")
    select: StudySelectSection = Field(description="Checkpoint selection on the project's validation prompts.")
    ifeval: IFEvalSection = Field(description="IFEval for every arm and the base.")
    report: dict[str, str] = Field(description="The report's settings (title).")
    study_name: Name = Field(description="The study's name: MLflow experiment lsp-study-<study_name>.")
