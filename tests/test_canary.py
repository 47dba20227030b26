"""The stale-weights alarm (lsp.engines.canary) on hand-made gaps; a real stale vLLM engine
triggers it in tests/test_engines.py (test_a_stale_engine_shows_in_the_logprob_gap), and healthy
training runs there log zero alerts."""

from __future__ import annotations

import logging

from lsp.engines.canary import GapCanary, gap_alert


def test_gap_alert_by_hand():
    # bf16 engine: floor 0.04; ratio 5 -> alert above 0.2
    assert not gap_alert(0.19, 0.04, 5.0, 0.01)
    assert gap_alert(0.21, 0.04, 5.0, 0.01)
    # fp32 engine: floor 1e-7, so 5 x floor is 5e-7: the absolute 0.01 decides
    assert not gap_alert(1e-3, 1e-7, 5.0, 0.01)
    assert gap_alert(0.02, 1e-7, 5.0, 0.01)


def test_the_first_gap_is_the_floor_and_alerts_are_counted(caplog):
    canary = GapCanary(max_gap_ratio=5.0, min_gap=0.01)
    assert canary.observe(None, 1) == {}  # an engine that is the policy: nothing to watch
    assert canary.observe(0.04, 1) == {"rollout/canary_alerts": 0.0}
    assert canary.observe(0.05, 2) == {"rollout/canary_alerts": 0.0}
    with caplog.at_level(logging.WARNING, logger="lsp.engines.canary"):
        assert canary.observe(0.5, 3) == {"rollout/canary_alerts": 1.0}
    assert "step 3" in caplog.text and "stale" in caplog.text
    assert canary.observe(0.3, 4) == {"rollout/canary_alerts": 2.0}
    assert canary.observe(0.04, 5) == {"rollout/canary_alerts": 2.0}  # a count, not a state
