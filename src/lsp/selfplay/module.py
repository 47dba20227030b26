"""The LightningModule that sequences one Language Self-Play step (method.md, Algorithm 1).

challenger rollout -> [on_challenger_rollout_end] -> solver rollout -> [on_solver_rollout_end]
-> rewards R and self-reward R_Q -> advantages -> [on_rewards_computed] -> reference log-probs
-> policy forward/backward in micro-batches -> one optimiser step. No maths here: advantages
and losses live in `lsp.selfplay.advantages` / `lsp.selfplay.losses`.

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

Data parallel (`trainer.strategy=ddp`, `lsp.selfplay.distributed`): every rank plays its share of the
step's queries; the ranks' batches are gathered into the global batch, on which advantages,
hooks' `on_rewards_computed` and metrics are computed identically on every rank; each rank then
back-propagates its own rows under the global normalisers and the gradients are summed once.
`on_challenger_rollout_end` / `on_solver_rollout_end` see the rank's own batch. On one process
the global batch is the rank's batch (the same object) and nothing is communicated.

Speed (issue 5, BENCHMARKS.md), none of which changes the maths: `share_prefix` runs each distinct
prompt once in the reference and training passes (`lsp.selfplay.logprobs`); the finite-gradient check is
the gradient norm (one pass); `retain_freed_memory` keeps glibc from returning the step's
activations to the OS between steps (CPU).
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor

from lsp.chat import render_chat
from lsp.engines import Engine, TorchEngine
from lsp.engines.sampling import SamplingConfig
from lsp.models import autocast
from lsp.selfplay import advantages as adv
from lsp.selfplay import distributed, losses
from lsp.selfplay.constraints import augment
from lsp.selfplay.logprobs import completion_logprobs, masked_sum
from lsp.selfplay.prompts import check_queries
from lsp.selfplay.records import QueryCheck, Rollout, SelfPlayBatch

log = logging.getLogger(__name__)
HOOKS = ("on_challenger_rollout_end", "on_solver_rollout_end", "on_rewards_computed")


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
    aggregation: str = "seq_sum"
    alpha_ch: float = 1.0
    scale_std: bool = False
    invalid_query: str = "penalize"
    self_reward_weight: float = 1.0
    micro_batch_size: int = 16
    grad_clip: float | None = 1.0
    max_nonfinite_steps: int = 3
    amp_dtype: torch.dtype | None = None
    prompt_queries: list[str] | None = None  # set: GRPO on these prompts, no Challenger
    share_prefix: bool = True  # one prompt pass per distinct prompt (lsp.selfplay.logprobs), same maths
    retain_freed_memory: bool = True  # CPU/glibc: reuse freed heap pages (retain_freed_memory)


@dataclass
class LossStats:
    """Per-role results of the forward/backward pass (detached)."""

    loss: float
    kl: float  # mean over sequences of the summed token log-ratio (the paper's k1 KL)
    tokens: int
    # mean |log p_engine - log p_policy| over sampled tokens; None: the engine is the policy
    logprob_gap: float | None = None


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def retain_freed_memory() -> bool:
    """glibc: keep freed heap memory for reuse instead of returning it to the OS at once.

    Without it, each step's forward/backward page-faults about 1 GB back in (its activations were
    unmapped or trimmed after the last step): about 1 s per step on a 2-core CPU, 10% of a
    SmolLM2 step. Peak RSS is unchanged (the same memory is reused); RSS no longer shrinks after
    the peak. Blocks over 32 MiB (glibc's largest threshold) are still mapped per allocation."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
        libc.mallopt(m_trim_threshold, 2**31 - 1))


class SelfPlayModule(L.LightningModule):
    def __init__(self, policy, reference, tokenizer, reward, self_reward, settings, optimizer,
                 engines: dict[str, Engine] | None = None, constraints=None):
        super().__init__()
        self.policy = policy  # the only trainable submodule (and the only one checkpointed)
        # Frozen helpers are kept out of the module tree: not saved, not counted as parameters.
        self.frozen = {"reference": reference, "reward": reward, "self_reward": self_reward}
        self.tokenizer = tokenizer
        self.settings = settings
        self.optimizer_factory = optimizer  # partial: params -> optimiser
        self.automatic_optimization = False
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.challenger_chat = render_chat(tokenizer, settings.challenger_prompt)
        # role -> the engine that samples it (lsp.engines); both default to decoding on the policy.
        default = TorchEngine(policy, tokenizer, settings.amp_dtype)
        self.engines = {"challenger": default, "solver": default} | (engines or {})
        # lsp.selfplay.constraints.ConstraintSampler: the environment appends its instructions to every
        # valid query (when the reward scores them); None: the Solver answers the query as is.
        self.constraints = constraints

    def on_fit_start(self) -> None:
        if self.settings.retain_freed_memory and self.device.type == "cpu":
            retain_freed_memory()

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
        if getattr(self, "pending_rng", None) is not None:  # resumed: the checkpoint's stream
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
        sp = self.challenge(timer) if self.settings.prompt_queries is None else self.from_prompts()
        if sp.check.valid.any():
            self.solve(sp, timer)
            self.call_hooks("on_solver_rollout_end", sp)
            self.score(sp, timer)
        with timer("gather"):
            parts = distributed.gather_batches(sp)
            full = distributed.merge_batches(parts, self.tokenizer.pad_token_id)
        self.assign_advantages(full)
        if full is not sp:
            self.take_rows(sp, full, parts)
        self.call_hooks("on_rewards_computed", full)
        return sp, full

    @staticmethod
    def take_rows(sp: SelfPlayBatch, full: SelfPlayBatch, parts: list[SelfPlayBatch]) -> None:
        """This rank's share of the global batch's advantages and rewards."""
        queries, valid = distributed.rank_rows(parts, distributed.rank())
        sp.challenger_advantages = full.challenger_advantages[queries]
        sp.challenger_reward = full.challenger_reward[queries]
        if sp.solver is not None:
            sp.solver_advantages = full.solver_advantages[valid]
            sp.solver_reward = full.solver_reward[valid]

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
        with timer("reward"):
            out = reward.score(instructions, sp.solver.completions, **extra)
        sp.rewards = out.values.float().view(-1, g)  # (Nv, G)
        sp.reward_components = {name: v.view(-1, g) for name, v in
                                getattr(reward, "last_components", {}).items()}
        sp.judge_failures = int(out.parse_failed.sum())
        if self.frozen["self_reward"] is not None:
            with timer("self_reward"):
                q_out = self.frozen["self_reward"].score(instructions, sp.solver.completions)
            sp.self_rewards = q_out.values.float().view(-1, g)  # (Nv, G)
            sp.judge_failures += int(q_out.parse_failed.sum())
            sp.self_reward_raw = q_out.raw

    def assign_advantages(self, sp: SelfPlayBatch) -> None:
        s = self.settings
        out = adv.selfplay_advantages(sp.rewards, sp.check.valid, sp.self_rewards,
                                      s.self_reward_weight, s.scale_std, s.invalid_query)
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
        roles = {}  # role -> (local rollout or None, advantages, loss weight, temperature, counts)
        if full.challenger is not None:
            roles["challenger"] = (sp.challenger, sp.challenger_advantages, s.alpha_ch,
                                   s.challenger.temperature, counts(full.challenger))
        if full.solver is not None:
            advantages = None if sp.solver is None else sp.solver_advantages.flatten()
            roles["solver"] = (sp.solver, advantages, 1.0, s.solver.temperature,
                               counts(full.solver))
        with timer("reference_logprobs"):
            refs = {role: self.reference_logprobs(r[0], r[3]) for role, r in roles.items()
                    if r[0] is not None}
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        with timer("forward_backward"):
            stats = {role: self.backward_role(*r, refs.get(role)) for role, r in roles.items()}
        if distributed.world_size() > 1:
            with timer("gradient_sync"):
                distributed.sync_gradients([p for p in self.policy.parameters()
                                            if p.requires_grad])
        total = sum(st.loss * roles[role][2] for role, st in stats.items())
        with timer("optimizer"):
            stepped = self.optimizer_step(opt, total)
        if stepped:
            with timer("weight_push"):
                self.push_weights()
        return stats

    def push_weights(self) -> None:
        """Give every engine that samples the policy its new weights (a no-op for engines that
        decode on the policy itself): the next rollout comes from the current weights."""
        for engine in {id(e): e for e in self.engines.values()}.values():
            engine.push(self.policy)

    def micro_batches(self, n: int):
        size = self.settings.micro_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, temperature: float) -> Tensor:
        # pi_ref at the same temperature as pi: the KL is between the two tempered distributions.
        ref = self.frozen["reference"]
        with autocast(self.device, self.settings.amp_dtype):
            parts = [
                completion_logprobs(ref, rollout.sequences[mb], rollout.attention_mask[mb],
                                    rollout.prompt_len, temperature,
                                    share_prefix=self.settings.share_prefix)
                for mb in self.micro_batches(rollout.sequences.shape[0])
            ]
        return torch.cat(parts).float()  # (B, C)

    def backward_role(self, rollout: Rollout | None, advantages: Tensor | None, weight: float,
                      temperature: float, counts: tuple[int, int], ref: Tensor | None):
        # Log-probs under the distribution that sampled the tokens (logits / temperature), so the
        # gradient is on-policy; top-k / top-p are refused at the config boundary (lsp.config).
        # counts: the global batch's (sequences, completion tokens) of this role: each rank's
        # loss is its share of the global one, and the ranks' gradients sum to it.
        s = self.settings
        n_seq, n_tok = counts
        loss_sum, kl_sum, gap_sum, has_gap = 0.0, 0.0, 0.0, 0.0
        local = 0 if rollout is None else rollout.sequences.shape[0]
        mask = None if rollout is None else rollout.completion_mask.float()  # (B, C)
        for mb in self.micro_batches(local):
            with autocast(self.device, s.amp_dtype):
                logp = completion_logprobs(
                    self.policy, rollout.sequences[mb], rollout.attention_mask[mb],
                    rollout.prompt_len, temperature, share_prefix=s.share_prefix,
                ).float()
            loss, _ = losses.policy_loss(
                logp, ref[mb], advantages[mb].to(logp), mask[mb], s.beta, s.kl_estimator,
                s.kl_placement, s.aggregation, num_sequences=n_seq, num_tokens=n_tok,
            )
            self.manual_backward(loss * weight)
            loss_sum += loss.item()
            kl_sum += masked_sum(logp.detach() - ref[mb], mask[mb], dim=-1).sum().item()
            if rollout.logprobs is not None:  # the engine's own log-probs of its samples
                gap = (logp.detach() - rollout.logprobs[mb].to(logp)).abs()
                gap_sum += masked_sum(gap, mask[mb]).item()
                has_gap = 1.0
        # one collective per role on every rank: the global loss, KL and engine gap
        loss_sum, kl_sum, gap_sum, has_gap = distributed.all_reduce_sum(
            [loss_sum, kl_sum, gap_sum, has_gap])
        gap = gap_sum / max(n_tok, 1) if has_gap else None
        return LossStats(loss=loss_sum, kl=kl_sum / max(n_seq, 1), tokens=int(n_tok),
                         logprob_gap=gap)

    def optimizer_step(self, opt, total_loss: float) -> bool:
        """One clipped optimiser step; False when a non-finite loss or gradient skipped it."""
        s = self.settings
        params = [p for p in self.policy.parameters() if p.grad is not None]
        # One pass over the gradients: their total norm is finite iff every gradient is.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not (math.isfinite(total_loss) and torch.isfinite(norm)):
            self.skip_nonfinite(opt)
            return False
        self.nonfinite_streak = 0
        self.grad_norm = norm
        if s.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, s.grad_clip, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True

    def skip_nonfinite(self, opt) -> None:
        opt.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: optimiser step skipped (%d in a row)",
                    self.global_step, self.nonfinite_streak)
        if self.nonfinite_streak >= self.settings.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_streak} consecutive non-finite losses; stopping. Lower optim.lr "
                "or check the reward scale; the last checkpoint is intact for resume=true."
            )
        # Lightning counts optimiser steps as global steps: count the skipped step too so the
        # step counter, checkpoints and max_steps stay aligned.
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_completed()

    # ---- metrics ----------------------------------------------------------------------------
    def log_step(self, sp: SelfPlayBatch, stats: dict[str, LossStats]) -> None:
        from lsp.selfplay.metrics import step_metrics

        metrics = step_metrics(sp, {k: vars(v) for k, v in stats.items()}, self.settings.alpha_ch)
        metrics["train/nonfinite_steps"] = float(self.nonfinite_total)
        if getattr(self, "grad_norm", None) is not None:
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
        states = extra.get("rng")
        if isinstance(states, dict):  # written by one process before per-rank states
            states = [states]
        if states and len(states) == distributed.world_size():
            # applied at the next step's start, not now: Lightning draws from the torch RNG
            # between this restore and the first batch (the data loader's base seed), which
            # would shift every later sample against an uninterrupted run
            self.pending_rng = states[distributed.rank()]
        elif states:
            log.warning("checkpoint holds RNG states of %d ranks, this run has %d: the ranks "
                        "keep their fresh seeds (rollouts differ from an uninterrupted run)",
                        len(states), distributed.world_size())


def counts(rollout: Rollout) -> tuple[int, int]:
    """(sequences, completion tokens) of a rollout: the loss normalisers of its role."""
    return rollout.sequences.shape[0], int(rollout.completion_mask.sum())


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
