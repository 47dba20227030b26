"""`python -m lsp.select run_dir=<training run>`: choose the checkpoint to evaluate.

Every complete checkpoint of the run answers the project's fixed validation prompts (never AlpacaEval
instructions) as the Solver, at the evaluation temperature; the training reward scores the answers;
the highest mean wins. Writes `<out_dir>/selection.json` (every candidate's score and the choice,
read by `python -m lsp.evaluate candidate.selection=...`) and `<out_dir>/answers/`; logs to MLflow.

The reward is the run's own (from the config the trainer saved in `<run_dir>/config.yaml`, or Hydra's
`<run_dir>/.hydra/config.yaml`, when `reward_from_run`), else the composed `reward` group; it is
built as `instantiate(reward_cfg, pool=ModelPool(...))`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lsp.chat import set_chat_date
from lsp.config import validate
from lsp.errors import exit_on_input_error
from lsp.evaluation.outputs import GenerationSettings, load_engine, sample_answers
from lsp.evaluation.selection import (
    Candidate,
    load_validation_prompts,
    run_candidates,
    select_checkpoint,
)
from lsp.models import resolve_device
from lsp.study import headline
from lsp.tracking import log_run, publish_figures


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
        scorer = hydra.utils.instantiate(reward_cfg, pool=ModelPool(device, cfg.model.cache_dir))
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


@hydra.main(config_path="../../conf", config_name="select", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    select(cfg)


if __name__ == "__main__":
    main()
