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

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lsp import headline
from lsp.chat import set_chat_date
from lsp.config import validate
from lsp.evaluation.outputs import GenerationSettings, load_engine, sample_answers
from lsp.io import atomic_write_json, checkpoint_step, list_checkpoints, slug
from lsp.models import resolve_device
from lsp.tracking import log_run, publish_figures

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
    # tqdm: the progress and its ETA (stderr); each candidate's result stays a line of its own
    scored, progress = [], tqdm(candidates, desc="select", unit="checkpoint")
    for i, cand in enumerate(progress, 1):
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
        progress.write(f"[select {i}/{len(candidates)}] step {cand.step}: mean reward "
                       f"{scored[-1]['score']:.4f} over {len(values)} prompts in "
                       f"{scored[-1]['seconds']:.0f} s")
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


def generator_name(spec: str) -> str:
    """`<run>/checkpoints/step_000200` -> `<run>_step_000200`; other specs slugged."""
    path = Path(spec)
    if path.is_dir():
        return slug(f"{path.parent.parent.name}_{path.name}" if path.parent.name == "checkpoints" else path.name)
    return slug(spec)


def candidate_model(cfg: DictConfig) -> tuple[str, str]:
    spec = chosen_path(cfg.candidate.selection)[0] if cfg.candidate.selection else cfg.candidate.model
    return spec, cfg.candidate.name or generator_name(spec)


# ---- the select stage (`python -m lsp.select`) ---------------------------------------------
def model_answers(settings: GenerationSettings, device: str, cache_dir: str | None):
    """An answer function that loads each candidate in turn (one model in memory at a time)."""

    def answer(cand: Candidate, prompts: list[str]) -> list[str]:
        engine, tok = load_engine(cand.path, settings, device, cache_dir)
        try:
            return sample_answers(engine, tok, prompts, settings)
        finally:
            del engine

    return answer


def run_chat_date(cfg: DictConfig) -> str:
    """The date the run's checkpoints were trained with (its saved config), else model.chat_date:
    their answers are scored as the policy saw its prompts."""
    saved = Path(cfg.run_dir) / "config.yaml"
    trained = OmegaConf.select(OmegaConf.load(saved), "model.chat_date") if saved.is_file() else None
    return trained or cfg.model.chat_date


def run_reward_config(cfg: DictConfig) -> tuple[DictConfig, str]:
    """The training run's reward config where the run saved its config, else the composed one."""
    for saved in (Path(cfg.run_dir) / "config.yaml", Path(cfg.run_dir) / ".hydra" / "config.yaml"):
        if not (cfg.reward_from_run and saved.exists()):
            continue
        run_cfg = OmegaConf.load(saved)
        if "reward" in run_cfg:  # merged with a model node: the reward may interpolate ${model.*}
            merged = OmegaConf.merge({"model": cfg.model}, {"model": run_cfg.get("model", {})},
                                     {"reward": run_cfg.reward})
            return merged.reward, str(saved)
    return cfg.reward, "conf/reward (composed)"


class ConstraintScorer:
    """The training reward under the constraint environment (lsp.selfplay.constraints): each augmented
    validation prompt is scored against the constraints it was given."""

    def __init__(self, scorer, constraints: dict[str, list]):
        self.scorer, self.constraints = scorer, constraints

    def score(self, instructions: list[str], responses: list[str]):
        rows = [self.constraints[q] for q in instructions]
        return self.scorer.score(instructions, responses, constraints=rows)


def with_constraints(cfg: DictConfig, prompts: list[str], scorer):
    """When the reward scores constraints, the validation prompts get them as training queries did
    (the run's rollout.constraints: k, held-out types never drawn), drawn once with cfg.seed, so
    every candidate answers the same augmented prompts. Otherwise unchanged."""
    from lsp.selfplay.constraints import ConstraintSampler, accepts_constraints, augment

    if not accepts_constraints(scorer):
        return prompts, scorer
    saved = Path(cfg.run_dir) / "config.yaml"
    env = OmegaConf.select(OmegaConf.load(saved), "rollout.constraints") if saved.is_file() else None
    sampler = ConstraintSampler.from_config(env, cfg.seed)
    drawn = {augment(q, c): c for q in prompts for c in [sampler.sample(q)]}
    return list(drawn), ConstraintScorer(scorer, drawn)


def select(cfg: DictConfig, scorer=None) -> dict:
    from lsp.models import ModelPool

    validate(cfg, "select")
    set_chat_date(run_chat_date(cfg))
    prompts, provenance = load_validation_prompts(cfg.validation_prompts)
    candidates = run_candidates(cfg.run_dir)
    if cfg.include_base:
        candidates.insert(0, Candidate(step=0, path=cfg.model.policy))
    reward_cfg, reward_source = run_reward_config(cfg)
    device = resolve_device(cfg.device)
    if scorer is None:
        scorer = instantiate(reward_cfg, pool=ModelPool(device, cfg.model.cache_dir))
    prompts, scorer = with_constraints(cfg, prompts, scorer)
    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    answer = model_answers(GenerationSettings(**gen, seed=cfg.seed), device, cfg.model.cache_dir)
    extra = {"run_dir": str(cfg.run_dir), "reward": OmegaConf.to_container(reward_cfg, resolve=True),
             "reward_source": reward_source, "generation": gen}
    result = select_checkpoint(candidates, prompts, answer, scorer, cfg.out_dir, provenance, extra)
    chosen = result["chosen"]
    print(f"Chosen: step {chosen['step']} (mean reward {chosen['score']:.4f}) of "
          f"{[(c['step'], round(c['score'], 4)) for c in result['candidates']]}")
    publish_figures(headline.select_figures(result),
                    cfg.get("metrics_file") or Path(cfg.out_dir) / "metrics.json", cfg.get("logger"), "select")
    log_run(cfg.get("logger"), (cfg.get("logger") or {}).get("run_name") or f"select_{Path(cfg.run_dir).name}",
            {"run_dir": cfg.run_dir, "reward": reward_cfg.get("_target_"), "n_prompts": len(prompts),
             "validation_prompts": provenance["name"], "n_candidates": len(candidates)},
            {"select/chosen_step": chosen["step"], "select/chosen_score": chosen["score"]},
            [Path(cfg.out_dir) / "selection.json"], tags={"lsp.stage": "select"},
            step_metrics=[("select/score", c["score"], c["step"]) for c in result["candidates"]])
    return result
