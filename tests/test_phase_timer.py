"""lsp.selfplay.runtime.PhaseTimer (the `perf/*_s` metrics): phases accumulate, and on CUDA the
timer waits for queued kernels at both edges, so a phase is charged its own GPU work. No GPU
here: CUDA's two calls are replaced by recorders that say when they ran."""

from __future__ import annotations

import time

import torch

from lsp.selfplay.runtime import PhaseTimer


def test_phases_accumulate_without_cuda():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("a"):
            time.sleep(0.01)
    assert timer.seconds["a"] >= 0.02


def test_cuda_work_is_awaited_at_both_edges(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    # an asynchronous GPU phase: its launch returns at once, synchronize waits 50 ms for it
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda: (events.append("sync"), time.sleep(0.05 if "body" in events else 0)))
    timer = PhaseTimer()
    with timer("generation"):
        events.append("body")
    assert events == ["sync", "body", "sync"]
    assert timer.seconds["generation"] >= 0.05  # the kernels' time, not just the launch
