"""The LightningModule that sequences one Language Self-Play step (method.md, Algorithm 1).

challenger rollout -> [on_challenger_rollout_end] -> solver rollout -> [on_solver_rollout_end]
-> rewards R and self-reward R_Q -> advantages -> [on_rewards_computed] -> reference log-probs
-> policy forward/backward in micro-batches -> one optimiser step. No maths here: advantages
and losses live in `lsp.selfplay.advantages` / `lsp.selfplay.losses`, the micro-batched passes
in `lsp.selfplay.passes`, timing / RNG / allocator helpers in `lsp.selfplay.runtime`.

Departures from / choices beyond the paper (each a named option in conf/):
- `algo.invalid_query`: degenerate Challenger outputs (`lsp.selfplay.prompts.check_queries`) are not sent
  to the Solver; what they are worth to the Challenger (`penalize` | `skip`) is the pure function
  `lsp.selfplay.advantages.selfplay_advantages`. Their KL term is kept in both cases.
- Training and reference log-probs are taken under the sampling temperature of their role
  (logits / T), so the gradient and the KL are those of the distribution that was sampled;
  top-k / top-p sampling, under which they would differ, is refused by `lsp.config`.
- A non-finite loss skips the optimiser step (counted as `train/nonfinite_steps`); after
  `trainer.max_nonfinite_steps` consecutive ones the run stops with an error.
- `trainer.micro_batch_size` splits the forward/backward; every micro-batch is normalised by the
  full step's counts, so the update equals the full-batch one.
- `algo.engine_correction` (default none): importance weights for an engine that samples a slightly
  different distribution than the policy trains (lsp.selfplay.losses.engine_weights).
- `model.lora` (default off, lsp.lora): adapters train; pi_ref is the policy with them disabled.

Data parallel (`trainer.strategy=ddp`, `lsp.selfplay.distributed`): every rank plays its share of the
step's queries; the ranks' batches are gathered into the global batch, on which advantages,
hooks' `on_rewards_computed` and metrics are computed identically on every rank; each rank then
back-propagates its own rows under the global normalisers and the gradients are summed once.
`on_challenger_rollout_end` / `on_solver_rollout_end` see the rank's own batch. On one process
the global batch is the rank's batch (the same object) and nothing is communicated.
Sharded (`trainer.strategy=fsdp`, `lsp.selfplay.fsdp`): the same, with the rollout decoded on
gathered weights, equal forward/backward counts on every rank, and FSDP's own reduce-scatter.

Speed (issue 5, BENCHMARKS.md), none of which changes the maths: `share_prefix` runs each distinct
prompt once in the reference and training passes (`lsp.selfplay.logprobs`); `fused_lm_head` computes the
target log-probs one vocabulary slice at a time, on real tokens only (`lsp.selfplay.lm_head`);
`reference_prompt_memo` runs the frozen reference over the Challenger's prompt, the same every
step, once per run (`lsp.selfplay.logprobs.PromptMemo`); `group_by_length` puts rows of similar
length in a micro-batch where prompts are not shared (`lsp.selfplay.passes`); the finite-gradient check is
the gradient norm (one pass); `cpu_allocator` ("heap") serves every block from glibc's heap
and keeps freed memory, so the step's activations are not page-faulted in again every step (CPU;
`lsp.selfplay.runtime.configure_cpu_allocator`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor

from lsp.chat import render_chat
from lsp.engines import Engine, EnginePool, TorchEngine
from lsp.engines.canary import GapCanary
from lsp.engines.sampling import SamplingConfig
from lsp.lora import adapters_disabled
from lsp.selfplay import advantages as adv
from lsp.selfplay import distributed, fsdp
from lsp.selfplay.constraints import augment
from lsp.selfplay.logprobs import PromptMemo
from lsp.selfplay.losses import LossStats, role_counts, role_weight, total_loss
from lsp.selfplay.metrics import step_metrics
from lsp.selfplay.passes import RolePass, backward_role, reference_logprobs
from lsp.selfplay.prompts import check_queries
from lsp.selfplay.records import QueryCheck, SelfPlayBatch
from lsp.selfplay.rewards import group_kwargs
from lsp.selfplay.runtime import (
    PhaseTimer,
    configure_cpu_allocator,
    rank_rng_state,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)


@dataclass
class SelfPlaySettings:
    num_queries: int = 8
    group_size: int = 4
    challenger_prompt: str = ""
    challenger: SamplingConfig = field(default_factory=SamplingConfig)
    solver: SamplingConfig = field(default_factory=SamplingConfig)
    max_query_chars: int = 2000
    reject_truncated: bool = True
    beta: float = 0.05
    kl_estimator: str = "k1"
    kl_placement: str = "reward"  # exact KL gradient (lsp.selfplay.losses); "loss" = as written
    engine_correction: str = "none"  # none | tis | tis_token (lsp.selfplay.losses.engine_weights)
    tis_cap: float = 2.0  # the truncation of the engine-correction weights
    canary: tuple[float, float] = (5.0, 0.01)  # rollout.canary: max_gap_ratio, min_gap (GapCanary)
    aggregation: str = "seq_sum"
    alpha_ch: float = 1.0
    scale_std: bool = False
    invalid_query: str = "penalize"
    invalid_margin: float = 1.0
    invalid_margin_scale: str = "spread"
    self_reward_weight: float = 1.0
    micro_batch_size: int = 16
    group_by_length: bool = True  # micro-batches of rows of similar length (lsp.selfplay.passes)
    grad_clip: float | None = 1.0
    max_nonfinite_steps: int = 3
    amp_dtype: torch.dtype | None = None
    prompt_queries: list[str] | None = None  # set: GRPO on these prompts, no Challenger
    share_prefix: bool = True  # one prompt pass per distinct prompt (lsp.selfplay.logprobs), same maths
    fused_lm_head: bool = True  # LM head + log-softmax per vocabulary slice (lsp.selfplay.lm_head)
    reference_prompt_memo: bool = True  # pi_ref's pass over the Challenger prompt kept (PromptMemo)
    cpu_allocator: str = "heap"  # CPU/glibc malloc: heap | keep | system (configure_cpu_allocator)


class SelfPlayModule(L.LightningModule):
    def __init__(self, policy, reference, tokenizer, reward, self_reward, settings, optimizer,
                 engines: dict[str, Engine] | None = None, constraints=None,
                 engine_pool: EnginePool | None = None):
        super().__init__()
        self.policy = policy  # the only trainable submodule (and the only one checkpointed)
        # Frozen helpers are kept out of the module tree: not saved, not counted as parameters.
        self.frozen = {"reference": reference, "reward": reward, "self_reward": self_reward}
        self.tokenizer = tokenizer
        self.settings = settings
        self.optimizer_factory = optimizer  # partial: params -> optimiser
        self.automatic_optimization = False
        self.nonfinite_streak = 0  # consecutive skipped steps (the run stops at a maximum)
        self.nonfinite_total = 0  # skipped steps of the run (checkpointed)
        self.grad_norm: Tensor | None = None  # of the last step taken (train/grad_norm)
        self.pending_rng: dict | None = None  # a checkpoint's RNG state, applied at the next step
        # The last step's metrics (step_metrics), read by callbacks (HFCheckpoint's marker,
        # MetricsHistory) and returned by lsp.train.train; {} before the first step.
        self.last_metrics: dict[str, float] = {}
        self.challenger_chat = render_chat(tokenizer, settings.challenger_prompt)
        # pi_ref's pass over the Challenger's prompt, which is the same every step (with the
        # constraint environment too: constraints go to the Solver), is run once and kept
        self.prompt_memos = {"challenger": PromptMemo()} if settings.reference_prompt_memo else {}
        # role -> the engine that samples it (lsp.engines); both default to decoding on the policy.
        default = TorchEngine(policy, tokenizer, settings.amp_dtype)
        self.engines = {"challenger": default, "solver": default} | (engines or {})
        # lsp.selfplay.constraints.ConstraintSampler: the environment appends its instructions to every
        # valid query (when the reward scores them); None: the Solver answers the query as is.
        self.constraints = constraints
        self.engine_pool = engine_pool  # the run's engines (roles and judges), started at setup
        self.canary = GapCanary(*settings.canary)  # the stale-weights alarm (lsp.engines.canary)

    def setup(self, stage: str) -> None:
        # inside fit, once the process group exists: engines that join it (vLLM) start here,
        # every rank in the same order (lsp.engines.vllm)
        if self.engine_pool is not None:
            self.engine_pool.start()

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":
            configure_cpu_allocator(self.settings.cpu_allocator)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return self.optimizer_factory(params=params)

    def call_hooks(self, name: str, batch: SelfPlayBatch) -> None:
        for callback in self.trainer.callbacks:
            hook = getattr(callback, name, None)
            if hook is not None:
                hook(self.trainer, self, batch)

    # ---- one step -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if self.pending_rng is not None:  # resumed: the checkpoint's stream
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        timer = PhaseTimer()
        start = time.perf_counter()
        sp, full = self.play(timer)
        stats = self.learn(sp, full, timer)
        # this rank's phase times (rank 0 logs them); tokens/s counts the global batch
        full.timings = timer.seconds | {"step": time.perf_counter() - start}
        self.log_step(full, stats)
        return None

    def play(self, timer: PhaseTimer) -> tuple[SelfPlayBatch, SelfPlayBatch]:
        """(this rank's batch, the global batch of every rank, identical on all ranks)."""
        self.policy.eval()  # no dropout while sampling
        # sharded (fsdp): an engine decoding on the policy needs its full weights gathered
        # (engines with their own copy, vLLM, were pushed full weights after the last step)
        on_policy = any(not e.pushes_weights for e in self.engines.values())
        gathered = fsdp.full_weights(self.policy) if on_policy else contextlib.nullcontext()
        with gathered:
            sp = self.challenge(timer) if self.settings.prompt_queries is None else self.from_prompts()
            if sp.check.valid.any():
                self.solve(sp, timer)
        if sp.solver is not None:
            self.call_hooks("on_solver_rollout_end", sp)
            self.score(sp, timer)
        with timer("gather"):
            parts = distributed.gather_batches(sp)
            full = distributed.merge_batches(parts, self.tokenizer.pad_token_id)
        self.assign_advantages(full)
        if full is not sp:
            distributed.take_rows(sp, full, parts)
        self.call_hooks("on_rewards_computed", full)
        return sp, full

    def from_prompts(self) -> SelfPlayBatch:
        """The data-driven GRPO baseline: N queries drawn from the prompt file (global torch RNG,
        so seeded and restored on resume) instead of the Challenger's."""
        pool, n = self.settings.prompt_queries, self.settings.num_queries
        queries = [pool[i] for i in torch.randint(len(pool), (n,)).tolist()]
        check = QueryCheck(queries, torch.ones(n, dtype=torch.bool), [""] * n)
        return SelfPlayBatch(step=self.global_step + 1, challenger=None, check=check)

    def challenge(self, timer: PhaseTimer) -> SelfPlayBatch:
        s = self.settings
        with timer("challenger_generation"):
            prompts = [self.challenger_chat] * s.num_queries
            challenger = self.engines["challenger"].generate(prompts, s.challenger)
        truncated = challenger.truncated if s.reject_truncated else None
        check = check_queries(challenger.completions, s.challenger_prompt, s.max_query_chars, truncated)
        sp = SelfPlayBatch(step=self.global_step + 1, challenger=challenger, check=check)
        self.call_hooks("on_challenger_rollout_end", sp)
        return sp

    def solve(self, sp: SelfPlayBatch, timer: PhaseTimer) -> None:
        s = self.settings
        queries = self.solver_queries(sp)
        prompts = [render_chat(self.tokenizer, q) for q in queries for _ in range(s.group_size)]
        with timer("solver_generation"):
            sp.solver = self.engines["solver"].generate(prompts, s.solver)

    def solver_queries(self, sp: SelfPlayBatch) -> list[str]:
        """The valid queries, each with the environment's constraints appended when it has any."""
        queries = sp.check.valid_queries
        if self.constraints is None:
            return queries
        # One seed per step from the torch RNG (seeded, and restored on resume).
        self.constraints.reseed(int(torch.randint(2**62, (1,))))
        sp.constraints = [self.constraints.sample(q) for q in queries]
        sp.solver_queries = [augment(q, c) for q, c in zip(queries, sp.constraints, strict=True)]
        return sp.solver_queries

    def score(self, sp: SelfPlayBatch, timer: PhaseTimer) -> None:
        g = self.settings.group_size
        queries = sp.solver_queries or sp.check.valid_queries  # as the Solver saw them
        instructions = [q for q in queries for _ in range(g)]
        reward = self.frozen["reward"]
        extra = {}
        if sp.constraints is not None:  # row i * G + j is scored against query i's constraints
            extra["constraints"] = [c for c in sp.constraints for _ in range(g)]
        with timer("reward"), adapters_disabled(self.policy):  # a judge naming the LoRA policy
            out = reward.score(instructions, sp.solver.completions, **extra)
        sp.rewards = out.values.float().view(-1, g)  # (Nv, G)
        sp.reward_components = {name: v.view(-1, g) for name, v in
                                getattr(reward, "last_components", {}).items()}
        sp.judge_failures = int(out.parse_failed.sum())
        if self.frozen["self_reward"] is not None:
            with timer("self_reward"), adapters_disabled(self.policy):  # pi_ref judges
                q_out = self.frozen["self_reward"].score(instructions, sp.solver.completions,
                                                         **group_kwargs(self.frozen["self_reward"], g))
            sp.self_rewards = q_out.values.float().view(-1, g)  # (Nv, G)
            sp.judge_failures += int(q_out.parse_failed.sum())
            sp.self_reward_raw = q_out.raw

    def assign_advantages(self, sp: SelfPlayBatch) -> None:
        s = self.settings
        out = adv.selfplay_advantages(sp.rewards, sp.check.valid, sp.self_rewards,
                                      s.self_reward_weight, s.scale_std, s.invalid_query,
                                      s.invalid_margin, s.invalid_margin_scale)
        sp.solver_advantages, sp.challenger_advantages = out.solver, out.challenger
        sp.solver_reward, sp.challenger_reward = out.solver_reward, out.challenger_reward

    # ---- learning ---------------------------------------------------------------------------
    def learn(self, sp: SelfPlayBatch, full: SelfPlayBatch, timer: PhaseTimer
              ) -> dict[str, LossStats]:
        """Back-propagate this rank's rows (`sp`) normalised by the global batch's counts
        (`full`), sum the gradients over the ranks, step. The roles come from the global batch,
        so every rank makes the same collective calls, with or without rows of its own."""
        s = self.settings
        self.policy.train()
        roles: dict[str, RolePass] = {}
        if full.challenger is not None:
            roles["challenger"] = RolePass(
                sp.challenger, sp.challenger_advantages, role_weight("challenger", s.alpha_ch),
                s.challenger.temperature, role_counts(full.challenger))
        if full.solver is not None:
            advantages = None if sp.solver is None else sp.solver_advantages.flatten()  # (B,)
            roles["solver"] = RolePass(sp.solver, advantages, role_weight("solver", s.alpha_ch),
                                       s.solver.temperature, role_counts(full.solver))
        with timer("reference_logprobs"), adapters_disabled(self.policy):  # LoRA: pi_ref
            refs = {role: reference_logprobs(self.frozen["reference"], r.rollout, r.temperature,
                                             s, self.device, self.prompt_memos.get(role))
                    for role, r in roles.items() if r.rollout is not None}
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        with timer("forward_backward"):
            stats = {role: backward_role(self.policy, r, refs.get(role), s, self.device,
                                         self.manual_backward) for role, r in roles.items()}
        if distributed.world_size() > 1 and not fsdp.is_sharded(self.policy):
            # (sharded: FSDP reduce-scattered every backward already)
            with timer("gradient_sync"):
                distributed.sync_gradients([p for p in self.policy.parameters()
                                            if p.requires_grad])
        total = total_loss({role: st.loss for role, st in stats.items()}, s.alpha_ch)
        with timer("optimizer"):
            stepped = self.clipped_step(opt, total)
        if stepped:
            with timer("weight_push"):
                self.push_weights()
        return stats

    def push_weights(self) -> None:
        """Give every engine that samples the policy its new weights (a no-op for engines that
        decode on the policy itself): the next rollout comes from the current weights."""
        engines = list({id(e): e for e in self.engines.values()}.values())
        state = None  # sharded: every rank gathers the full tensors (a collective) for its engine
        if fsdp.is_sharded(self.policy) and any(e.pushes_weights for e in engines):
            state = fsdp.full_state_dict(self.policy, offload=False)
        for engine in engines:
            engine.push(self.policy, state)

    def clipped_step(self, opt, loss: float) -> bool:
        """One clipped optimiser step (`loss`: the step's total); False when a non-finite loss or
        gradient skipped it. (Not Lightning's `optimizer_step` hook, which manual optimisation
        never calls.)

        A skipped step still goes through `opt.step()` (Lightning's public path), with every
        gradient set to None: torch.optim leaves a parameter without a gradient untouched (no
        update, no weight decay, no moment or step-count change; Optimizer.zero_grad's doc), so
        the weights and the optimiser state are unchanged, while Lightning counts the step as a
        global step: the step counter, checkpoint steps and max_steps stay aligned on resume."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        # One pass over the gradients: their total norm is finite iff every gradient is.
        sharded = fsdp.is_sharded(self.policy)  # then the norm is over every rank's shards
        norm = (fsdp.grad_norm(params) if sharded
                else torch.nn.utils.get_total_norm([p.grad for p in params]))
        finite = math.isfinite(loss) and bool(torch.isfinite(norm))
        if finite:
            self.nonfinite_streak = 0
            self.grad_norm = norm
            if self.settings.grad_clip and sharded:
                fsdp.clip_grads(params, self.settings.grad_clip, norm)
            elif self.settings.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, self.settings.grad_clip, norm)
        else:
            opt.zero_grad(set_to_none=True)  # the step below then changes nothing
            self.count_nonfinite()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return finite

    def count_nonfinite(self) -> None:
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: optimiser step skipped (%d in a row)",
                    self.global_step, self.nonfinite_streak)
        if self.nonfinite_streak >= self.settings.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_streak} consecutive non-finite losses; stopping. Lower optim.lr "
                "or check the reward scale; the last checkpoint is intact for resume=true."
            )

    # ---- metrics ----------------------------------------------------------------------------
    def log_step(self, sp: SelfPlayBatch, stats: dict[str, LossStats]) -> None:
        metrics = step_metrics(sp, stats, self.settings.alpha_ch)
        metrics["train/nonfinite_steps"] = float(self.nonfinite_total)
        metrics |= self.canary.observe(metrics.get("rollout/logprob_gap"), sp.step)
        if self.grad_norm is not None:  # None until a step was taken
            metrics["train/grad_norm"] = float(self.grad_norm)
        self.last_metrics = metrics
        # Loggers get the 1-based step this batch made (as checkpoints and history.csv do);
        # Lightning's own logging would use the 0-based count of finished batches.
        for logger in self.loggers:
            logger.log_metrics(metrics, step=sp.step)
        bar = {"reward": "solver/reward_mean", "tok/s": "perf/tokens_per_s"}
        self.log_dict({k: metrics[v] for k, v in bar.items() if v in metrics}, prog_bar=True,
                      logger=False, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Policy weights travel as a Hugging Face folder beside this file (HFCheckpoint);
        # keeping them out of the Lightning file avoids storing them twice. Every rank's RNG
        # state (called on every rank; rank 0 writes the file), so a resume continues each
        # rank's own stream.
        checkpoint["state_dict"] = {}
        checkpoint["lsp"] = {"nonfinite_total": self.nonfinite_total,
                             "rng": distributed.gather_objects(rng_state())}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The policy was loaded from the checkpoint's HF folder before fit(); Lightning's strict
        # load then sees exactly the current weights.
        checkpoint["state_dict"] = self.state_dict()
        extra = checkpoint.get("lsp", {})
        self.nonfinite_total = extra.get("nonfinite_total", 0)
        # applied at the next step's start, not now: Lightning draws from the torch RNG between
        # this restore and the first batch (the data loader's base seed), which would shift
        # every later sample against an uninterrupted run
        self.pending_rng = rank_rng_state(extra.get("rng"), distributed.world_size(),
                                          distributed.rank())
