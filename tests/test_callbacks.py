"""DegenerationMonitor: Challenger queries that collapse onto repeats raise alerts; GRPO queries
(draws from a prompt file, so repeats are expected) are not judged for collapse, only the judge."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lsp.selfplay.callbacks import DegenerationMonitor


class Recorder:
    def __init__(self):
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step):
        self.logged.append(metrics)


def batch(step: int, queries: list[str], challenger: bool, judge_failures: int = 0):
    lengths = torch.tensor([len(q.split()) for q in queries])
    return SimpleNamespace(
        step=step, judge_failures=judge_failures, self_rewards=None,
        challenger=SimpleNamespace(completion_lengths=lengths) if challenger else None,
        check=SimpleNamespace(queries=queries, valid=torch.ones(len(queries), dtype=torch.bool)),
        rewards=torch.zeros(len(queries), 2),
    )


def run(challenger: bool, judge_failures: int = 0) -> tuple[DegenerationMonitor, Recorder]:
    monitor, rec = DegenerationMonitor(), Recorder()
    trainer = SimpleNamespace(loggers=[rec])
    for step in (1, 2, 3):  # the same two queries every step: 100% repeats from step 2
        monitor.on_rewards_computed(trainer, None, batch(step, ["Say hi.", "Name a river."],
                                                         challenger, judge_failures))
    return monitor, rec


def test_repeated_challenger_queries_raise_alerts():
    monitor, rec = run(challenger=True)
    assert rec.logged[-1]["degeneration/repeat_frac"] == 1.0
    assert monitor.alerts >= 2 and rec.logged[-1]["degeneration/alerts"] == monitor.alerts


def test_grpo_queries_are_not_judged_for_collapse_but_the_judge_is():
    monitor, rec = run(challenger=False)
    assert monitor.alerts == 0 and "degeneration/repeat_frac" not in rec.logged[-1]
    monitor, rec = run(challenger=False, judge_failures=3)  # 3 of 4 judged answers unparseable
    assert rec.logged[-1]["degeneration/parse_failure_rate"] == 0.75 and monitor.alerts == 3
