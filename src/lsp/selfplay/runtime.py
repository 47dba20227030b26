"""Process-level helpers of a training step that are not its maths: phase timing, the RNG
streams a checkpoint carries, and the CPU allocator setting. `lsp.selfplay.module` uses them."""

from __future__ import annotations

import ctypes
import logging
import random
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

log = logging.getLogger(__name__)


class PhaseTimer:
    """Seconds per named phase of one step, logged as `perf/<phase>_s` metrics (the reason it is
    not a Lightning profiler: a profiler's timings do not reach the metrics, and this is shorter).
    A phase entered twice accumulates."""

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


def rng_state() -> dict:
    """This process's torch / Python / NumPy (and CUDA) RNG states, for a checkpoint."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_state(states: list[dict] | dict | None, world_size: int, rank: int) -> dict | None:
    """The RNG state a checkpoint saved for this rank, or None (none saved, or another world
    size: the ranks then keep their fresh seeds, with a warning)."""
    if isinstance(states, dict):  # written by one process before per-rank states
        states = [states]
    if states and len(states) == world_size:
        return states[rank]
    if states:
        log.warning("checkpoint holds RNG states of %d ranks, this run has %d: the ranks "
                    "keep their fresh seeds (rollouts differ from an uninterrupted run)",
                    len(states), world_size)
    return None
