"""The stale-weights alarm: `rollout/logprob_gap` (the mean |log p_engine - log p_policy| of the
sampled tokens, lsp.selfplay.passes) watched against its first step's value.

At step 1 the engine holds the policy's initial weights, so the gap there is the engine's
precision alone (about 1e-6 nats per token for an fp32 engine, about 0.04 for vLLM in bf16 against
an fp32 policy): that is the floor. Later the gap moves a little with the weights (bf16 rounding
of other values); an engine that stopped receiving the weights (a push that failed or was never
wired, TRL issue 5312, verl 7495) drifts away by the whole update instead. A step whose gap
exceeds both `max_gap_ratio` x the floor and `min_gap` (so a floor of about 0 does not make every
rounding difference an alert) logs a warning and adds one to `rollout/canary_alerts`.

After a resume the floor is measured again at the first resumed step (the engine was rebuilt
from the checkpoint's weights, so it is fresh there too).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def gap_alert(gap: float, floor: float, max_gap_ratio: float, min_gap: float) -> bool:
    """True when `gap` is out of line with the `floor` (module doc)."""
    return gap > max(max_gap_ratio * floor, min_gap)


class GapCanary:
    def __init__(self, max_gap_ratio: float = 5.0, min_gap: float = 0.01):
        self.max_gap_ratio, self.min_gap = max_gap_ratio, min_gap
        self.floor: float | None = None  # the first observed gap
        self.alerts = 0

    def observe(self, gap: float | None, step: int) -> dict[str, float]:
        """The canary's metrics for a step whose gap is `gap` (None: the engine is the policy
        itself, nothing to watch, no metric)."""
        if gap is None:
            return {}
        if self.floor is None:
            self.floor = gap
        elif gap_alert(gap, self.floor, self.max_gap_ratio, self.min_gap):
            self.alerts += 1
            log.warning(
                "stale-weights canary, step %d: rollout/logprob_gap %.4g exceeds %.3g x its first "
                "step's %.4g (and %.3g): the engine may not be sampling the current policy (was "
                "the weight push skipped?)", step, gap, self.max_gap_ratio, self.floor,
                self.min_gap)
        return {"rollout/canary_alerts": float(self.alerts)}
