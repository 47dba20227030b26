"""Wall time of every study stage run: artifacts/timings/<stage>.json, one entry per invocation
(a killed and resumed stage has several; its time is their sum). Not a DVC output: a stage's
outputs are cleared when it reruns, the record of how long it took is kept. The report's
"Wall time per stage" table reads these files."""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from lsp.io import atomic_write_json
from lsp.study.markdown import table

TIMINGS = Path("artifacts") / "timings"


def record(stage: str, seconds: float, ok: bool, folder: Path = TIMINGS) -> None:
    """Append one invocation of `stage` (e.g. `train@lsp-0`) to its file."""
    path = folder / f"{stage}.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append({"seconds": round(seconds, 1), "ok": ok,
                 "finished": datetime.now(UTC).isoformat(timespec="seconds")})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, runs)


def timed(stage_of):
    """Decorate a stage's main(*args): `stage_of(*args)` names the stage; its wall time is
    recorded whether it finishes or raises (a kill leaves no record: the rerun's is added)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            start, ok = time.perf_counter(), False
            try:
                out = fn(*args)
                ok = True
                return out
            finally:
                record(stage_of(*args), time.perf_counter() - start, ok)
        return run
    return wrap


def load(folder: Path = TIMINGS) -> dict[str, dict]:
    """stage -> {seconds: the sum over invocations, invocations, ok: the last one's}."""
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        runs = json.loads(path.read_text())
        out[path.stem] = {"seconds": round(sum(r["seconds"] for r in runs), 1),
                          "invocations": len(runs), "ok": bool(runs and runs[-1]["ok"])}
    return out


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def section(found: dict[str, dict]) -> list[str]:
    """The report's "Wall time per stage": one row per stage run, in the order DVC ran them
    (file names sort by stage kind, which is not that order: sorted by kind then run), and the
    total. A stage that ran more than once (killed, resumed) shows its invocations."""
    if not found:
        return []
    rows = [[stage, _minutes(t["seconds"]), str(t["invocations"]), "yes" if t["ok"] else "no"]
            for stage, t in found.items()]
    total = sum(t["seconds"] for t in found.values())
    rows.append(["total", _minutes(total), "", ""])
    return ["## Wall time per stage", "",
            "Summed over each stage's invocations (`artifacts/timings/`, `lsp.study.timings`).", "",
            *table(["stage", "wall time", "invocations", "finished"], rows)]
