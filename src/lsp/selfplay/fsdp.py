"""Sharded data-parallel self-play (`trainer.strategy=fsdp`): the policy's weights, gradients and
AdamW state split over the ranks with torch's FSDP2 (`fully_shard`), on Lightning's process launch.

Everything `lsp.selfplay.distributed` says for `ddp` holds (own rollouts per rank, the global batch
gathered, global normalisers, rank 0 writes); what sharding changes:
- every forward of a sharded module all-gathers its weights, and every backward reduce-scatters
  its gradients, so all ranks must make the same forward/backward calls: a rank with fewer
  micro-batches than the busiest rank runs zero-weighted dummy passes (`micro_steps`, `dummy_loss`),
  and each micro-batch makes one forward (`share_prefix`, which makes one or two depending on the
  rows, is off for the sharded policy's pass: lsp.selfplay.passes);
- generation decodes a rank-dependent number of tokens, so it runs on full weights gathered once
  for the whole rollout (`full_weights`: no collective per token; the full policy is held for the
  duration, as in verl / OpenRLHF, which gather it for their engines);
- the reduce-scatter sums (divide factor 1): our micro-batch losses are already normalised by the
  global counts, so the sum over ranks is the 1-rank gradient;
- the gradient norm is the global norm over the shards (`grad_norm`);
- checkpoints hold full tensors (`full_state_dict`; the optimiser state through
  `SelfPlayFSDP.optimizer_state`), so a checkpoint loads with `from_pretrained` and resumes on any
  number of ranks with `fsdp`.

Frozen models (reference, reward, judge) are not sharded: each rank holds its own copy (docs/training.md,
"Several processes", memory per GPU).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from lsp.selfplay.distributed import SelfPlayDDP, all_reduce_max, all_reduce_sum


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The model's FSDP units, root first ([] when it is not sharded)."""
    fsdp_module, _ = _fsdp()
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


def is_sharded(model: nn.Module) -> bool:
    return bool(sharded_modules(model))


def shard(model: nn.Module, reshard_after_forward: bool = True) -> None:
    """fully_shard each block the model names in `_no_split_modules` (Hugging Face: its decoder
    layers), then the root (embeddings, final norm, head, tied weights included); in place."""
    _, fully_shard = _fsdp()
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"trainer.strategy=fsdp: {type(model).__name__} names no blocks to shard "
                         "(_no_split_modules); use trainer.strategy=ddp")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    for unit in sharded_modules(model):
        unit.set_gradient_divide_factor(1.0)  # sum over ranks (module doc)
        # a plain SUM, not NCCL's PreMulSum by 1 (which gloo lacks)
        unit.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def full_weights(model: nn.Module):
    """Inside: every FSDP unit holds its full weights and forwards make no collective (one
    all-gather per unit on entry, every rank together); outside: sharded again. A no-op for a
    model that is not sharded."""
    units = sharded_modules(model)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def micro_steps(local: int) -> int:
    """The number of micro-batches every rank must run: the busiest rank's (one collective)."""
    return all_reduce_max(local)


def dummy_loss(policy: nn.Module, device) -> Tensor:
    """A zero loss over a 2-token forward: its backward changes no gradient but makes every FSDP
    unit's all-gather and reduce-scatter, for a rank that has run out of micro-batches."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    logits = policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, 2, V)
    return logits.float().sum() * 0.0


def local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norm(params: list[Tensor]) -> Tensor:
    """The global L2 norm of the gradients: each rank's shards' squares, summed over the ranks."""
    # one device-to-host copy for all parameters (not one sync per parameter)
    squares = float(torch.stack([local(p.grad).double().pow(2).sum() for p in params]).sum())
    total = all_reduce_sum([squares])[0]
    return torch.tensor(math.sqrt(total) if math.isfinite(total) else float("nan"))


def clip_grads(params: list[Tensor], max_norm: float, norm: Tensor) -> None:
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            local(p.grad).mul_(coef)


def full_state_dict(model: nn.Module, offload: bool = True) -> dict[str, Tensor]:
    """The full tensors; a collective: every rank calls it. offload: on the CPU, on rank 0 only
    ({} on the others: a checkpoint); otherwise on every rank, on its device (an engine push)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=offload))


class SelfPlayFSDP(SelfPlayDDP):
    """SelfPlayDDP (launch, cluster environments, CPU threads, no DDP wrapper) whose policy is
    sharded with FSDP2 at setup (module doc). `reshard_after_forward=False` keeps each unit's full
    weights from forward to backward (ZeRO-2-like: less communication, more memory)."""

    def __init__(self, *args, reshard_after_forward: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def configure_ddp(self) -> None:
        super().configure_ddp()  # every rank starts from rank 0's weights
        shard(self.lightning_module.policy, self.reshard_after_forward)

    def optimizer_state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            self.lightning_module.policy, optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, checkpoint) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            set_optimizer_state_dict(self.lightning_module.policy, optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
