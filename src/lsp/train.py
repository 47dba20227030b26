"""`python -m lsp.train [experiment=...] [overrides]`: Language Self-Play training.

`train(cfg)` is the testable entry point; `main` is the thin Hydra shell around it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf

from lsp.chat import render_chat, set_chat_date
from lsp.config import ConfigError, check_models, validate
from lsp.engines import EnginePool, VLLMSettings
from lsp.engines.sampling import SamplingConfig
from lsp.errors import InputError, exit_on_input_error
from lsp.io import (
    CHECKPOINT_MARKER,
    CorruptCheckpointError,
    atomic_write_json,
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
)
from lsp.lora import ADAPTER_DIR, add_adapters, parameter_bytes
from lsp.models import (
    ModelPool,
    amp_dtype,
    dtype_of,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_model,
)
from lsp.selfplay.constraints import ConstraintSampler, accepts_constraints
from lsp.selfplay.data import SelfPlayData
from lsp.selfplay.distributed import rank_seed
from lsp.selfplay.module import SelfPlayModule, SelfPlaySettings
from lsp.selfplay.prompts import (
    DEFAULT_TASK,
    DEFAULT_TEMPLATE,
    load_prompt_file,
    render_challenger_prompt,
)
from lsp.tracking import run_tags
from lsp.tracking.logger import BufferedMLFlowLogger, open_run

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def run_directory(cfg: DictConfig) -> Path:
    """The run's folder: run_dir if set; on resume, the newest run of this name that has a
    checkpoint; else Hydra's fresh run folder."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if cfg.resume:
        runs = [p.parent.parent for p in Path("outputs", cfg.name).glob("*/checkpoints/step_*")]
        runs = [r for r in runs if latest_checkpoint(r / "checkpoints")]
        if runs:
            return max(runs, key=lambda r: latest_checkpoint(r / "checkpoints").stat().st_mtime)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs", cfg.name, time.strftime("%Y-%m-%d_%H-%M-%S"))


def settings_from(cfg: DictConfig, device: str, world_size: int = 1) -> SelfPlaySettings:
    """The module's settings; `num_queries` is the global count, each of the `world_size` ranks
    plays its share (lsp.config refuses a count that does not divide)."""
    a, r = cfg.algo, cfg.rollout
    prompt = render_challenger_prompt(r.task or DEFAULT_TASK, r.template or DEFAULT_TEMPLATE)
    return SelfPlaySettings(
        num_queries=r.num_queries // world_size, group_size=r.group_size, challenger_prompt=prompt,
        challenger=SamplingConfig(**r.challenger), solver=SamplingConfig(**r.solver),
        max_query_chars=r.max_query_chars, reject_truncated=r.reject_truncated, beta=a.beta,
        kl_estimator=a.kl_estimator, kl_placement=a.kl_placement, aggregation=a.aggregation,
        engine_correction=a.get("engine_correction", "none"), tis_cap=a.get("tis_cap", 2.0),
        canary=(r.canary.max_gap_ratio, r.canary.min_gap) if r.get("canary") else (5.0, 0.01),
        alpha_ch=a.alpha_ch, scale_std=a.scale_std, invalid_query=a.invalid_query,
        invalid_margin=a.invalid_margin, invalid_margin_scale=a.invalid_margin_scale,
        self_reward_weight=a.self_reward.weight if a.self_reward.enabled else 0.0,
        micro_batch_size=cfg.trainer.micro_batch_size, grad_clip=cfg.trainer.grad_clip,
        group_by_length=cfg.trainer.group_by_length,
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps, cpu_allocator=cfg.trainer.cpu_allocator,
        amp_dtype=amp_dtype(cfg.model.amp, device),
        share_prefix=cfg.model.share_prefix, fused_lm_head=cfg.model.fused_lm_head,
        reference_prompt_memo=cfg.model.reference_prompt_memo,
        prompt_queries=load_prompt_file(r.prompt_file) if r.prompt_file else None,
    )


def build_rewards(cfg: DictConfig, pool: ModelPool):
    reward = instantiate(cfg.reward, pool=pool)
    sr = OmegaConf.to_container(cfg.algo.self_reward, resolve=True)
    if not sr.pop("enabled"):
        return reward, None
    sr.pop("weight")
    return reward, instantiate(sr, pool=pool)


def build_module(cfg: DictConfig, device: str, resume_from: Path | None,
                 world_size: int = 1) -> SelfPlayModule:
    m = cfg.model
    lora = m.get("lora") is not None and m.lora.r > 0  # lsp.lora: the base model + adapters
    # Resuming: the policy comes from the checkpoint (LoRA: the base model and the checkpoint's
    # adapter; the checkpoint's merged export seeds the engines); the reference stays initial.
    policy_path = str(resume_from) if resume_from else resolve_model(m.policy, m.cache_dir)
    attn = m.attn_implementation
    policy = load_causal_lm(resolve_model(m.policy, m.cache_dir) if lora else policy_path,
                            m.dtype, device, trainable=not lora, attn_implementation=attn)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if lora:
        policy = add_adapters(policy, m.lora.r, m.lora.alpha, m.lora.dropout,
                              list(m.lora.target_modules),
                              resume_from / ADAPTER_DIR if resume_from else None).train()
    tokenizer = load_tokenizer(policy_path)
    engines = EnginePool(device, VLLMSettings(**cfg.rollout.vllm))
    pool = ModelPool(device, m.cache_dir, attn_implementation=attn, engines=engines)
    if lora and m.reference == m.policy:  # pi_ref and its judges: the policy, adapters off
        pool.share(m.reference, policy, tokenizer)
        log.info("LoRA: pi_ref is the policy with its adapters disabled, not a copy: %.1f MB "
                 "of %s weights saved", parameter_bytes(policy, dtype_of(m.reference_dtype)) / 1e6,
                 m.reference_dtype)
    reference, _ = pool.causal_lm(m.reference, m.reference_dtype)
    reward, self_reward = build_rewards(cfg, pool)
    optimizer = instantiate(cfg.optim, _partial_=True)
    settings = settings_from(cfg, device, world_size)
    check_context(cfg, policy, tokenizer, settings)
    constraints = constraint_sampler(cfg, reward)
    # The policy's engine per role (one shared engine when both roles name the same kind).
    roles = {role: engines.get(cfg.rollout[role].engine, policy, tokenizer, policy_path, m.dtype,
                               settings.amp_dtype, pushed=True) for role in ("challenger", "solver")}
    return SelfPlayModule(policy, reference, tokenizer, reward, self_reward, settings, optimizer,
                          engines=roles, constraints=constraints, engine_pool=engines)


def check_context(cfg: DictConfig, policy, tokenizer, settings: SelfPlaySettings) -> None:
    """Refuse, before step 1, lengths the policy's positions cannot hold: the Challenger's prompt
    plus its answer, and the Solver's prompt (the chat template around a query of up to
    rollout.challenger.max_new_tokens tokens, or the prompt file's longest) plus its answer."""
    limit = getattr(policy.config, "max_position_embeddings", None)
    if not limit:
        return

    def tokens(text: str) -> int:
        return len(tokenizer(render_chat(tokenizer, text), add_special_tokens=False).input_ids)

    r, queries = cfg.rollout, settings.prompt_queries
    query = max(map(tokens, queries)) if queries else tokens("") + r.challenger.max_new_tokens
    needs = {"rollout.solver.max_new_tokens": (query, r.solver.max_new_tokens)}
    if not queries:
        needs["rollout.challenger.max_new_tokens"] = (tokens(settings.challenger_prompt),
                                                      r.challenger.max_new_tokens)
    for key, (prompt, new) in needs.items():
        if prompt + new > limit:
            raise ConfigError(f"invalid config: {key}={new}: a prompt of up to {prompt} tokens plus "
                              f"{new} new tokens is {prompt + new}, more than the model's "
                              f"max_position_embeddings={limit}")


def constraint_sampler(cfg: DictConfig, reward) -> ConstraintSampler | None:
    """The constraint environment, when the reward scores constraints (conf/rollout)."""
    if not accepts_constraints(reward):
        return None
    try:
        return ConstraintSampler.from_config(cfg.rollout.constraints, cfg.seed)
    except ValueError as err:
        raise ConfigError(f"invalid config: rollout.constraints: {err}") from err


def check_world(cfg: DictConfig, world: int, device: str = "cpu") -> None:
    """What several processes need that one does not (the rest: lsp.config)."""
    if world == 1:
        return
    if cfg.rollout.num_queries % world:
        raise ConfigError(f"invalid config: rollout.num_queries={cfg.rollout.num_queries} is the "
                          f"global count per step and must divide by the {world} processes")
    if cfg.trainer.strategy == "fsdp" and cfg.model.get("lora") and cfg.model.lora.r > 0:
        raise ConfigError("invalid config: model.lora with trainer.strategy=fsdp is not supported "
                          "(the adapters and the shared reference are not sharded): use ddp")
    engines = {f"rollout.{r}.engine": cfg.rollout[r].engine for r in ("challenger", "solver")}
    if cfg.algo.self_reward.get("engine"):
        engines["algo.self_reward.engine"] = cfg.algo.self_reward.engine
    vllm = [k for k, v in engines.items() if v == "vllm"]
    if vllm and not device.startswith("cpu"):
        # vLLM's in-process executor takes device index 0 (UniProcExecutor), so every rank's
        # engine would land on cuda:0; its torchrun mode (external_launcher) is the way, not
        # yet run on a GPU here. On CPUs each rank runs its own engine (lsp.engines.vllm).
        raise ConfigError(f"invalid config: {', '.join(vllm)}=vllm with {world} GPU processes is "
                          "not supported yet (every rank's engine would be placed on cuda:0; "
                          "docs/training.md, 'Several processes'): use engine=lsp")


def build_logger(cfg: DictConfig, run_id: str | None) -> BufferedMLFlowLogger:
    lg = cfg.logger
    tags = {"algo": cfg.algo.name, "name": cfg.name}
    sweep_id = cfg.sweep_id
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["overrides"] = " ".join(hc.overrides.task)
        if sweep_id is None and hc.mode == RunMode.MULTIRUN:
            sweep_id = Path(hc.sweep.dir).name  # the folder the summary is written into
    if sweep_id:
        tags["sweep_id"] = str(sweep_id)
    tags = run_tags(lg, tags)  # a study's tags and parent run (lsp.study.params.study_logger)
    artifacts = Path(lg.artifact_location).resolve().as_uri() if lg.artifact_location else None
    return BufferedMLFlowLogger(experiment_name=lg.experiment_name, tracking_uri=lg.tracking_uri,
                                artifact_location=artifacts, run_name=lg.run_name or cfg.name,
                                run_id=run_id, tags=None if run_id else tags,
                                retry_every_s=lg.retry_every_s)



def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    callbacks = [TQDMProgressBar(refresh_rate=1)]
    extra = {"checkpoint": {"dirpath": str(run_dir / "checkpoints")},
             "sample_table": {"path": str(run_dir / "samples.jsonl")},
             "history": {"path": str(run_dir / "history.csv")}}
    # The checkpoint last: a step's history row and samples are written before the checkpoint
    # that a resume continues after, so a kill between the two cannot lose the step's records
    # (with the checkpoint first, a SIGKILL right after its rename lost history row 7 in CI).
    names = sorted(cfg.callbacks, key=lambda name: name == "checkpoint")
    for name in names:
        callbacks.append(instantiate(cfg.callbacks[name], **extra.get(name, {})))
    return callbacks


RUN_ID_FILE = "mlflow_run.json"  # the run's MLflow run id, written when the run is created


def resume_point(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from, the MLflow run to continue). A run killed before its
    first checkpoint restarts from step 0 but continues its MLflow run (no orphaned runs)."""
    if not cfg.resume:
        return None, None
    import json

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    id_file = run_dir / RUN_ID_FILE
    run_id = json.loads(id_file.read_text())["run_id"] if id_file.exists() else None
    if ckpt is None:
        log.warning("resume=true but %s has no checkpoint: starting from step 0", run_dir)
        return None, run_id
    try:
        check_checkpoint(ckpt)
    except CorruptCheckpointError as err:
        older = list_checkpoints(run_dir / "checkpoints")[:-1]
        hint = (f"delete {ckpt} to resume from {older[-1].name}" if older
                else f"delete {ckpt} to start from step 0")
        raise CorruptCheckpointError(f"resume: {err}; {hint}") from None
    info = json.loads((ckpt / CHECKPOINT_MARKER).read_text())
    log.info("resuming %s from step %d (%s)", run_dir, info["step"], ckpt)
    return ckpt, info.get("mlflow_run_id") or run_id


class RunDirError(InputError):
    """The run folder cannot hold the run (not writable, too little free space)."""


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"lsp")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir={run_dir}: cannot write there ({err.strerror or err})") from None


def check_free_space(run_dir: Path, module: SelfPlayModule, cfg: DictConfig) -> None:
    """Before step 1: room for the checkpoints the run keeps at once (the newest is written
    before the oldest goes). One holds the policy's weights (the HF folder) and AdamW's two fp32
    moments per trainable parameter (the Lightning state): 1.6 GB for SmolLM2-135M in fp32."""
    c, steps = cfg.callbacks.checkpoint, int(cfg.trainer.max_steps)
    saved = {*range(c.every_n_steps, steps + 1, c.every_n_steps), steps}
    kept = {s for s in saved if s in set(c.keep_steps or ())
            or (c.keep_every_n_steps and s % c.keep_every_n_steps == 0)}
    count = min(len(saved), c.keep_last + 1 + len(kept))
    params = list(module.policy.parameters())
    size = sum(p.numel() * (p.element_size() + (8 if p.requires_grad else 0)) for p in params)
    free = shutil.disk_usage(run_dir).free
    if free < count * size:
        raise RunDirError(f"run_dir={run_dir}: {free / 2**30:.2f} GiB free, but the {count} "
                          f"checkpoints this run keeps need about {count * size / 2**30:.2f} GiB "
                          "(callbacks.checkpoint): free space or choose another run_dir")


def build_strategy(t: DictConfig, accelerator: str):
    """trainer.strategy names one of trainer.strategies (instantiated), or `auto`: one process
    (Lightning's single-device strategy), or `ddp` when several devices or nodes are asked for."""
    name = t.strategy
    if name == "auto":
        name = "ddp" if requested_processes(t, accelerator) > 1 else None
    return "auto" if name is None else instantiate(t.strategies[name])


def requested_processes(t: DictConfig, accelerator: str) -> int:
    """Processes the Trainer will run: devices x nodes (devices=auto: every GPU, one CPU)."""
    devices = t.devices
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if accelerator in ("cuda", "gpu") else 1
    elif isinstance(devices, str) and "," in devices or not isinstance(devices, (int, str)):
        devices = len([d for d in (devices.split(",") if isinstance(devices, str) else devices)
                       if str(d).strip()])
    return int(devices) * int(t.num_nodes)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if resolve_device(cfg.device).startswith("cuda") else "cpu"
    return L.Trainer(
        max_steps=t.max_steps, accelerator=accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=build_strategy(t, accelerator), precision=t.precision,
        logger=False, callbacks=build_callbacks(cfg, run_dir),  # the logger: train()
        log_every_n_steps=t.log_every_n_steps, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(run_dir),
    )


def train(cfg: DictConfig) -> dict:
    validate(cfg)
    set_chat_date(cfg.model.chat_date)
    check_models(cfg)
    run_dir = run_directory(cfg)
    check_writable(run_dir)
    ckpt, run_id = resume_point(cfg, run_dir)
    # The Trainer first: it knows this process's rank and device (under torchrun, SLURM, or
    # Lightning's own launch, which re-runs this command once per extra rank).
    trainer = build_trainer(cfg, run_dir)
    world = trainer.world_size
    check_world(cfg, world, str(trainer.strategy.root_device))
    if world > 1 and not cfg.run_dir and not isinstance(
            trainer.strategy.cluster_environment, LightningEnvironment):
        # torchrun / SLURM start every rank itself: each would make its own timestamped folder
        raise ConfigError("invalid config: run_dir is not set: with several processes started by "
                          "torchrun or SLURM, give every rank the same run_dir=<folder>")
    # each rank its own stream (lsp.selfplay.distributed.rank_seed; rank 0 = the run's seed)
    L.seed_everything(rank_seed(cfg.seed, trainer.global_rank), workers=True, verbose=False)
    device = str(trainer.strategy.root_device)
    if device.startswith("cuda"):
        torch.cuda.set_device(trainer.strategy.root_device)
    module = build_module(cfg, device, ckpt, world)
    if trainer.is_global_zero and cfg.callbacks.get("checkpoint"):
        check_free_space(run_dir, module, cfg)
    logger = None
    if trainer.is_global_zero:  # rank 0 alone opens the store (ranks would race to create it)
        logger = build_logger(cfg, run_id)
        trainer.loggers = [logger]
        open_run(logger, None if run_id else OmegaConf.to_container(cfg, resolve=True))
        if run_id is None:
            atomic_write_json(run_dir / RUN_ID_FILE, {"run_id": logger.run_id})
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer.fit(module, datamodule=SelfPlayData(),
                ckpt_path=str(ckpt / "trainer_state.ckpt") if ckpt else None,
                weights_only=False)  # our own file: it holds RNG states (numpy) besides tensors
    last = latest_checkpoint(run_dir / "checkpoints")
    return {"run_dir": str(run_dir), "mlflow_run_id": logger.run_id if logger else None,
            "global_step": trainer.global_step, "last_checkpoint": str(last) if last else None,
            "metrics": dict(module.last_metrics)}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    log.info("done: step %d, run dir %s", result["global_step"], result["run_dir"])


if __name__ == "__main__":
    main()
