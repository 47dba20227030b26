"""Data-parallel self-play on Lightning's process launch (`trainer.strategy=ddp`).

One step on W ranks makes the same update as one step on one rank on the same rollouts
(tests/test_distributed.py checks it to 1e-5):
- each rank samples `num_queries / W` Challenger queries and their answers with its own RNG
  stream (`rank_seed`), and scores them: the costly work is split;
- the ranks' batches are gathered (`gather_batches`): the Challenger's batch baseline, the
  invalid-query rule and every logged metric see the global batch, identically on every rank;
- each rank back-propagates its own rows normalised by the GLOBAL counts (sequences, tokens),
  then one bucketed all-reduce sums the gradients (`sync_gradients`): the sum over ranks is the
  1-rank gradient, and every rank makes the same collective calls whatever its count of valid
  queries (a rank with none sends zeros);
- the gradient norm, the non-finite check and the optimiser step then see identical gradients
  on every rank, so the weights stay identical without a broadcast.

Why not Lightning's own `ddp` (torch's DistributedDataParallel wrapper): it all-reduces inside
every backward call, and a rank's number of backward calls depends on how many of its queries
were valid, so ranks would wait in mismatched collectives (a hang). `SelfPlayDDP` is Lightning's
DDPStrategy (the launch, its cluster environments: torchrun, SLURM, LSF; the process group,
barrier and broadcast) without the wrapper.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lsp.selfplay.records import QueryCheck, SelfPlayBatch, concat_rollouts

log = logging.getLogger(__name__)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (a 1-rank run is unchanged); every other rank gets an
    independent stream derived from (seed, rank), not seed + rank, which would overlap the
    streams of neighbouring seeds."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] on one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks of a short list of floats (one collective)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int) -> int:
    """The largest of the ranks' `value` (one collective; `value` itself on one process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sync_gradients(params: list[Tensor], bucket_numel: int = 1 << 24) -> None:
    """Sum each parameter's gradient over the ranks, in place: one all-reduce per bucket of at
    most `bucket_numel` elements (64 MB of fp32). A parameter without a gradient on this rank
    (no local backward) sends zeros, so every rank sends the same buckets."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params, bucket_numel):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad.copy_(g.view_as(p.grad))


def _buckets(params: list[Tensor], bucket_numel: int) -> list[list[Tensor]]:
    buckets, current, size = [], [], 0
    for p in params:  # parameter order is the same on every rank (same model)
        if current and (size + p.numel() > bucket_numel or p.grad.dtype != current[0].grad.dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    return [*buckets, current] if current else buckets


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- the global batch -------------------------------------------------------------------------
def gather_batches(sp: SelfPlayBatch) -> list[SelfPlayBatch]:
    """Every rank's step batch (tensors on the CPU), in rank order; [sp] itself on one process."""
    if world_size() == 1:
        return [sp]
    return gather_objects(_to_cpu(sp))


def _to_cpu(sp: SelfPlayBatch) -> SelfPlayBatch:
    import copy

    out = copy.copy(sp)
    for name, value in vars(sp).items():
        if isinstance(value, Tensor):
            setattr(out, name, value.cpu())
        elif name in ("challenger", "solver") and value is not None:
            rollout = copy.copy(value)
            for key, x in vars(value).items():
                if isinstance(x, Tensor):
                    setattr(rollout, key, x.cpu())
            setattr(out, name, rollout)
        elif name == "reward_components":
            setattr(out, name, {k: v.cpu() for k, v in value.items()})
    out.check = QueryCheck(sp.check.queries, sp.check.valid.cpu(), sp.check.reasons)
    return out


def merge_batches(parts: list[SelfPlayBatch], pad_id: int) -> SelfPlayBatch:
    """The global batch: the ranks' queries in rank order (rank r's N_r queries, then rank r+1's),
    answers and scores in the same order. One part is returned as it is."""
    if len(parts) == 1:
        return parts[0]

    def rollouts(name):
        found = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return concat_rollouts(found, pad_id) if found else None

    def tensors(name):
        found = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return torch.cat(found) if found else None

    def lists(name):
        found = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return [x for f in found for x in f] if found else None

    check = QueryCheck([q for p in parts for q in p.check.queries],
                       torch.cat([p.check.valid for p in parts]),
                       [r for p in parts for r in p.check.reasons])
    components = {name: torch.cat([p.reward_components[name] for p in parts
                                   if name in p.reward_components])
                  for name in {n for p in parts for n in p.reward_components}}
    out = SelfPlayBatch(
        step=parts[0].step, challenger=rollouts("challenger"), check=check,
        solver=rollouts("solver"), rewards=tensors("rewards"), self_rewards=tensors("self_rewards"),
        judge_failures=sum(p.judge_failures for p in parts), constraints=lists("constraints"),
        solver_queries=lists("solver_queries"), reward_components=components,
    )
    raws = [getattr(p, "self_reward_raw", None) for p in parts]
    if any(r is not None for r in raws):
        out.self_reward_raw = [x for r in raws if r is not None for x in r]
    return out


def rank_rows(parts: list[SelfPlayBatch], r: int) -> tuple[slice, slice]:
    """Rank r's rows in the global batch: (its queries among all N, its valid queries among Nv)."""
    q0 = sum(len(p.check.queries) for p in parts[:r])
    v0 = sum(int(p.check.valid.sum()) for p in parts[:r])
    n, nv = len(parts[r].check.queries), int(parts[r].check.valid.sum())
    return slice(q0, q0 + n), slice(v0, v0 + nv)


def take_rows(sp: SelfPlayBatch, full: SelfPlayBatch, parts: list[SelfPlayBatch]) -> None:
    """This rank's share (`sp`) of the global batch's (`full`) advantages and rewards."""
    queries, valid = rank_rows(parts, rank())
    sp.challenger_advantages = full.challenger_advantages[queries]
    sp.challenger_reward = full.challenger_reward[queries]
    if sp.solver is not None:
        sp.solver_advantages = full.solver_advantages[valid]
        sp.solver_reward = full.solver_reward[valid]


# ---- the strategy -----------------------------------------------------------------------------
class SelfPlayDDP(DDPStrategy):
    """Lightning's DDPStrategy without torch's DDP wrapper (module doc): the module syncs its
    gradients itself, once per step. The weights are broadcast from rank 0 once at setup, so
    ranks that loaded different files (a mistake) still start equal."""

    def __init__(self, *args, cpu_threads: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_threads = cpu_threads

    def configure_ddp(self) -> None:
        for tensor in self.model.state_dict().values():
            dist.broadcast(tensor.data if tensor.device.type != "meta" else tensor, src=0)

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.root_device.type == "cpu":
            # W processes on one CPU: each takes its share of the cores, not all of them.
            threads = self.cpu_threads or max(1, (os.cpu_count() or 1) // self.num_processes)
            torch.set_num_threads(threads)
            rank_zero_info(f"SelfPlayDDP: {self.num_processes} processes x {threads} CPU threads")
