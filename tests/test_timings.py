"""Stage wall times (lsp.study.timings): every invocation recorded, a failed one too; a resumed
stage's time is the sum of its invocations."""

from __future__ import annotations

import pytest

from lsp.study import timings


def test_each_invocation_is_recorded_and_summed(tmp_path, monkeypatch):

    @timings.timed(lambda arm, seed, *_: f"train@{arm}-{seed}")
    def stage(arm, seed, fail=False):
        if fail:
            raise RuntimeError("killed")
        return arm

    timings.record("train@lsp-0", 12.5, ok=False, folder=tmp_path)
    timings.record("train@lsp-0", 30.0, ok=True, folder=tmp_path)
    assert timings.load(tmp_path) == {"train@lsp-0": {"seconds": 42.5, "invocations": 2, "ok": True}}
    monkeypatch.chdir(tmp_path)
    assert stage("grpo", 1) == "grpo"
    with pytest.raises(RuntimeError):
        stage("grpo", 1, True)
    got = timings.load(tmp_path / "artifacts" / "timings")["train@grpo-1"]
    assert got["invocations"] == 2 and got["ok"] is False and got["seconds"] >= 0


def test_the_report_section_lists_each_stage_and_the_total():
    found = {"train@lsp-0": {"seconds": 125.0, "invocations": 2, "ok": True},
             "report": {"seconds": 5.0, "invocations": 1, "ok": False}}
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in timings.section(found) if line.startswith("| ")][1:]  # after the header
    assert rows == [["train@lsp-0", "2 min 05 s", "2", "yes"], ["report", "0 min 05 s", "1", "no"],
                    ["total", "2 min 10 s", "", ""]]
    assert timings.section({}) == []
