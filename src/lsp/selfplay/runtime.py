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
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def synchronize() -> None:
    # CUDA kernels run after their launch returns: without waiting for them at the edges, a
    # phase's GPU time would be charged to the next phase that reads a result (a no-op on CPU)
    if torch.cuda.is_initialized():  # False without CUDA, and before its first use
        torch.cuda.synchronize()


CPU_ALLOCATOR_MODES = ("heap", "keep", "system")


def configure_cpu_allocator(mode: str = "heap") -> bool:
    """glibc's malloc settings for a CPU run (`trainer.cpu_allocator`):
    - "heap" (default): every block from the heap (`M_MMAP_MAX` = 0, what
      `GLIBC_TUNABLES=glibc.malloc.mmap_max=0` sets), and freed heap memory kept for reuse;
    - "keep": freed memory kept, but blocks over 32 MiB still mapped per allocation;
    - "system": glibc's defaults (blocks over an adaptive 128 KiB-32 MiB threshold mapped and
      unmapped per allocation, freed heap memory returned to the OS).

    Why: with the defaults each step's forward/backward page-faults about 1 GB back in (its
    activations were unmapped or trimmed after the last step). Measured with `make bench`
    (BENCHMARKS.md), on 2-core CPUs: "keep" saved about 1 s of a 10 s SmolLM2 step; "heap" on top
    of "keep" 1.05-1.11x the step on an Intel Xeon with AMX and 1.07-1.20x on an AVX2-only AMD EPYC,
    peak RSS within 2%. RSS no longer shrinks after the peak. When the heap cannot grow (brk
    fails), glibc still falls back to mmap. Returns whether the settings were taken (False off
    Linux / glibc, and for "system", which changes nothing)."""
    if mode not in CPU_ALLOCATOR_MODES:
        raise ValueError(f"cpu_allocator: {mode!r} is not one of {CPU_ALLOCATOR_MODES}")
    if mode == "system" or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # malloc.h
    settings = [(m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1)]
    if mode == "heap":
        settings.append((m_mmap_max, 0))
    return all(bool(libc.mallopt(param, value)) for param, value in settings)


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
