"""Checkpoint selection on the project's own validation prompts, never on AlpacaEval instructions.

A run's checkpoints are `<run_dir>/checkpoints/step_XXXXXX/` folders (normal HF folders); only those
holding `lsp_checkpoint.json` (written last by the trainer) are complete. Each candidate answers the
fixed validation prompts (`validation_prompts.json`, authored for this project) as the Solver would,
the answers are scored by the training reward (anything with `.score(instructions, responses)`
returning `.values` (B,)), and the candidate with the highest mean reward is chosen (ties: the later
step). Every candidate's score and the choice are written to `selection.json`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lsp.io import atomic_write_json, checkpoint_step, list_checkpoints

VALIDATION_PROMPTS = Path(__file__).parent / "validation_prompts.json"


@dataclass
class Candidate:
    step: int
    path: str  # a checkpoint folder, or a model spec (the base model as step 0)


def run_candidates(run_dir: str | Path) -> list[Candidate]:
    """A run's complete checkpoints, by step."""
    return [Candidate(checkpoint_step(p), str(p)) for p in list_checkpoints(Path(run_dir) / "checkpoints")]


def load_validation_prompts(path: str | Path | None = None) -> tuple[list[str], dict]:
    """(instructions, provenance: path, name, count, sha256 of the instructions)."""
    path = Path(path or VALIDATION_PROMPTS)
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data["prompts"] if isinstance(data, dict) else data
    prompts = [p["instruction"] if isinstance(p, dict) else p for p in items]
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    name = data.get("name") if isinstance(data, dict) else path.stem
    return prompts, {"path": str(path), "name": name, "n": len(prompts), "sha256": digest}


# (candidate, prompts) -> one answer per prompt
AnswerFn = Callable[[Candidate, list[str]], list[str]]


def score_candidates(candidates: Sequence[Candidate], prompts: list[str], answer: AnswerFn,
                     scorer, answers_dir: str | Path | None = None) -> list[dict]:
    scored, started = [], time.perf_counter()
    for i, cand in enumerate(candidates, 1):
        t0 = time.perf_counter()
        answers = answer(cand, prompts)
        out = scorer.score(prompts, answers)
        values = out.values.float()  # (B,)
        failed = getattr(out, "parse_failed", None)
        scored.append({
            **asdict(cand), "score": float(values.mean()), "score_std": float(values.std()) if len(values) > 1 else 0.0,
            "n": len(values), "parse_failures": int(failed.sum()) if failed is not None else None,
            "seconds": round(time.perf_counter() - t0, 2),
        })
        eta = (time.perf_counter() - started) / i * (len(candidates) - i)
        print(f"[select {i}/{len(candidates)}] step {cand.step}: mean reward {scored[-1]['score']:.4f} "
              f"over {len(values)} prompts in {scored[-1]['seconds']:.0f} s (ETA {eta:.0f} s)", flush=True)
        if answers_dir is not None:
            atomic_write_json(Path(answers_dir) / f"step_{cand.step:06d}.json", [
                {"instruction": q, "answer": a, "reward": float(r)}
                for q, a, r in zip(prompts, answers, values.tolist(), strict=True)
            ])
    return scored


def choose(scored: Sequence[dict]) -> dict:
    if not scored:
        raise ValueError("no candidate checkpoints to choose from")
    return max(scored, key=lambda s: (s["score"], s["step"]))


def select_checkpoint(candidates: Sequence[Candidate], prompts: list[str], answer: AnswerFn,
                      scorer, out_dir: str | Path, provenance: dict | None = None,
                      extra: dict | None = None) -> dict:
    """Score every candidate, choose one, write `<out_dir>/selection.json` and return its content."""
    if not candidates:
        raise ValueError("no complete checkpoints (folders with lsp_checkpoint.json) to select from")
    out_dir = Path(out_dir)
    scored = score_candidates(candidates, prompts, answer, scorer, out_dir / "answers")
    result = {
        "criterion": "mean training reward of Solver answers on the validation prompts",
        "validation_prompts": provenance or {"n": len(prompts)},
        **(extra or {}),
        "candidates": scored,
    }
    # Downstream DVC stages depend on this folder, not on the checkpoints: the chosen weights'
    # digest makes a retrained checkpoint at the same path and score still count as a change.
    chosen = choose(scored)
    result["chosen"] = {**chosen, "weights_sha256": weights_digest(chosen["path"])}
    atomic_write_json(out_dir / "selection.json", result)
    return result


def weights_digest(path: str | Path) -> str | None:
    """SHA-256 over a model folder's weight files (None for a hub id or a built-in spec)."""
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def chosen_path(selection_file: str | Path) -> tuple[str, int]:
    """(model path, step) of the checkpoint a selection chose."""
    chosen = json.loads(Path(selection_file).read_text())["chosen"]
    return chosen["path"], chosen["step"]
