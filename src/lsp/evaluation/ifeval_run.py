"""The IFEval stage: a candidate's and the base's answers, scored and compared (entry point:
`python -m lsp.ifeval`, whose docstring lists the outputs)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lsp import headline
from lsp.chat import set_chat_date
from lsp.config import validate
from lsp.evaluation import ifeval as ife
from lsp.evaluation.outputs import GenerationSettings, generate_outputs
from lsp.evaluation.selection import candidate_model
from lsp.io import atomic_write_json
from lsp.tracking import flatten, log_run, publish_figures

HEADLINE = ife.HEADLINE


def settings(cfg: DictConfig) -> GenerationSettings:
    gen = OmegaConf.to_container(cfg.eval.generation, resolve=True)
    gen["max_new_tokens"] = cfg.ifeval.max_new_tokens
    return GenerationSettings(**gen, seed=cfg.seed)


def evaluate_model(cfg: DictConfig, prompts: list[dict], spec: str, name: str,
                   folder: Path) -> list[dict]:
    """Generate (resumable, <folder>/generations), score, and keep one model's per-prompt
    records (<folder>/records.jsonl)."""
    requests = [{"instruction": p["prompt"], "dataset": "ifeval"} for p in prompts]
    outputs = generate_outputs(spec, requests, name, settings(cfg), folder / "generations",
                               cfg.device, cfg.model_cache_dir)
    records = ife.score_outputs(prompts, outputs)
    ife.write_records(folder / "records.jsonl", records)
    return records


def write_metrics(cfg: DictConfig, folder: Path, spec: str, records: list[dict],
                  base: list[dict] | None = None, metrics_file: str | Path | None = None) -> dict:
    """<folder>/details.json (everything) and the headline figures (lsp.headline: what
    `dvc metrics show` lists) in `metrics_file` (default <folder>/metrics.json); returns the
    details."""
    details = {"model": spec, **ife.model_report(records, asdict(settings(cfg)))}
    if base is not None:
        details["vs_base"] = {mode: ife.paired_difference(records, base, mode, cfg.ifeval.n_boot,
                                                          cfg.seed)
                              for mode in ("strict", "loose")}
    details["splits"] = ife.split_report(records, held_out_types(cfg), base, cfg.ifeval.n_boot,
                                         cfg.seed)
    atomic_write_json(folder / "details.json", details)
    publish_figures(headline.ifeval_figures(details), metrics_file or folder / "metrics.json",
                    cfg.get("logger"), "ifeval")
    return details


def held_out_types(cfg: DictConfig) -> list[str]:
    """The instruction types training never draws (ifeval.held_out; null: the training
    default, lsp.selfplay.constraints.HELD_OUT_TYPES)."""
    from lsp.selfplay.constraints import HELD_OUT_TYPES

    chosen = OmegaConf.select(cfg, "ifeval.held_out")
    return list(HELD_OUT_TYPES if chosen is None else chosen)


def run(cfg: DictConfig) -> dict:
    validate(cfg, "ifeval")
    set_chat_date(cfg.model.chat_date)
    prompts = ife.load_or_download(cfg.ifeval.path)[: cfg.ifeval.limit or None]
    out = Path(cfg.out_dir)
    base = evaluate_model(cfg, prompts, cfg.base.model, cfg.base.name, out / cfg.base.name)
    base_details = write_metrics(cfg, out / cfg.base.name, cfg.base.model, base)
    spec, name = candidate_model(cfg)
    if name == cfg.base.name:
        raise ValueError(f"candidate.name must differ from base.name ({name!r})")
    cand = evaluate_model(cfg, prompts, spec, name, out / name)
    details = write_metrics(cfg, out / name, spec, cand, base, cfg.get("metrics_file"))
    print(format_table({cfg.base.name: base_details, name: details}))
    log_details(cfg, name, details, out / name)
    return details


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


def log_details(cfg: DictConfig, name: str, details: dict, folder: Path) -> None:
    flat = flatten({k: v for k, v in details.items() if k != "generation"}, "ifeval/")
    params = {"candidate": details["model"], "base": cfg.base.model,
              "n_prompts": details["n_prompts"],
              **{f"generation.{k}": v for k, v in details["generation"].items()}}
    logger = cfg.get("logger") or {}
    log_run(cfg.get("logger"), logger.get("run_name") or f"ifeval_{name}", params, flat,
            [folder / "details.json", folder / "records.jsonl"],
            tags={"lsp.stage": "ifeval", "lsp.candidate": name})
