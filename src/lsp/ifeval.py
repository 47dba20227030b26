"""`python -m lsp.ifeval [candidate.model=...]`: IFEval for a candidate and the base model.

Writes <out_dir>/<name>/records.jsonl (per prompt: response, pass/fail per instruction, strict and
loose, truncated) and <out_dir>/<name>/metrics.json (the four official figures with SEs, accuracy
per instruction type, answers that hit max_new_tokens; for the candidate also the paired
difference against the base with a bootstrap 95% CI and an exact McNemar p-value). Generation is
resumable (<out_dir>/generations/), and the figures land in MLflow.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lsp.chat import set_chat_date
from lsp.evaluate import candidate_model
from lsp.evaluation import ifeval as ife
from lsp.evaluation.outputs import GenerationSettings, generate_outputs
from lsp.evaluation.runtime import atomic_write_json
from lsp.evaluation.tracking import flatten, log_run

HEADLINE = ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose",
            "instruction_level_loose")


def settings(cfg: DictConfig) -> GenerationSettings:
    gen = OmegaConf.to_container(cfg.eval.generation, resolve=True)
    gen["max_new_tokens"] = cfg.ifeval.max_new_tokens
    return GenerationSettings(**gen, seed=cfg.seed)


def evaluate_model(cfg: DictConfig, prompts: list[dict], spec: str, name: str) -> list[dict]:
    """Generate (resumable), score, and write one model's records and metrics."""
    gen = settings(cfg)
    requests = [{"instruction": p["prompt"], "dataset": "ifeval"} for p in prompts]
    store = Path(cfg.out_dir) / "generations"
    outputs = generate_outputs(spec, requests, name, gen, store, cfg.device, cfg.model_cache_dir)
    records = ife.score_outputs(prompts, outputs)
    folder = Path(cfg.out_dir) / name
    ife.write_records(folder / "records.jsonl", records)
    atomic_write_json(folder / "metrics.json",
                      {"model": spec, **ife.model_report(records, asdict(gen))})
    return records


def run(cfg: DictConfig) -> dict:
    set_chat_date(cfg.model.chat_date)
    prompts = ife.load_or_download(cfg.ifeval.path)[: cfg.ifeval.limit or None]
    base = evaluate_model(cfg, prompts, cfg.base.model, cfg.base.name)
    spec, name = candidate_model(cfg)
    if name == cfg.base.name:
        raise ValueError(f"candidate.name must differ from base.name ({name!r})")
    cand = evaluate_model(cfg, prompts, spec, name)
    metrics_path = Path(cfg.out_dir) / name / "metrics.json"
    metrics = {"model": spec, **ife.model_report(cand, asdict(settings(cfg))), "vs_base": {
        mode: ife.paired_difference(cand, base, mode, cfg.ifeval.n_boot, cfg.seed)
        for mode in ("strict", "loose")}}
    atomic_write_json(metrics_path, metrics)
    print(format_table({cfg.base.name: ife.summary(base), name: metrics}))
    _log(cfg, name, metrics, metrics_path)
    return metrics


def format_table(reports: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(HEADLINE) + " |"
    lines = [head, "|---" * (len(HEADLINE) + 1) + "|"]
    for name, m in reports.items():
        cells = [f"{100 * m[k]:.1f} +- {100 * m[k + '_se']:.1f}" for k in HEADLINE]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for mode, d in reports[list(reports)[-1]].get("vs_base", {}).items():
        lo, hi = d["ci95"]
        lines.append(f"prompt-level {mode} vs base: {100 * d['difference']:+.1f} points "
                     f"(95% CI {100 * lo:+.1f} .. {100 * hi:+.1f}; {d['wins']} won, {d['losses']} "
                     f"lost; McNemar p = {d['mcnemar_p']:.3g})")
    return "\n".join(lines)


def _log(cfg: DictConfig, name: str, metrics: dict, path: Path) -> None:
    flat = flatten({k: v for k, v in metrics.items() if k != "generation"}, "ifeval/")
    params = {"candidate": metrics["model"], "base": cfg.base.model, "n_prompts": metrics["n_prompts"],
              **{f"generation.{k}": v for k, v in metrics["generation"].items()}}
    log_run(cfg.get("logger"), f"ifeval_{name}", params, flat,
            [path, path.parent / "records.jsonl"], tags={"lsp.stage": "ifeval", "lsp.candidate": name})


@hydra.main(config_path="../../conf", config_name="ifeval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ife.IFEvalFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
