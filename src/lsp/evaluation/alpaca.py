"""The AlpacaEval stage: a candidate's and the base's outputs, judged and scored (entry point:
`python -m lsp.evaluate`, whose docstring lists the outputs and examples)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lsp import headline
from lsp.chat import set_chat_date
from lsp.config import validate
from lsp.evaluation.outputs import (
    GenerationSettings,
    as_model_outputs,
    generate_outputs,
    load_eval_set,
    stratified_subset,
)
from lsp.evaluation.sanity import eval_pair_stats, format_sanity, sanity_report
from lsp.evaluation.scoring import score_head2head
from lsp.evaluation.selection import candidate_model
from lsp.io import CHECKPOINT_MARKER, atomic_write_json
from lsp.tracking import flatten, log_run, log_to_existing_run, publish_figures

ALPACA_EVAL_SIZE = 805  # LC win rates need each instruction's position in the full set
HUB_V1, HUB_V2 = "alpaca_eval", "alpaca_eval_gpt4_baseline"  # alpaca-eval's hub dataset configs


def _outputs(cfg: DictConfig, spec: str, name: str, records: list[dict]) -> list[dict]:
    settings = GenerationSettings(**OmegaConf.to_container(cfg.eval.generation, resolve=True), seed=cfg.seed)
    # The resumable generation store. `generations_dir` may contain `{generator}`: the DVC study
    # keeps each model's outputs in its own generate stage's folder.
    template = cfg.get("generations_dir") or str(Path(cfg.out_dir) / "generations")
    store = Path(template.format(generator=name))
    generated = generate_outputs(spec, records, name, settings, store, cfg.device,
                                 cfg.model_cache_dir)
    outputs = as_model_outputs(generated, name)  # alpaca-eval's four keys only
    atomic_write_json(Path(cfg.out_dir) / "model_outputs" / f"{name}.json", outputs)
    return outputs


def _baseline(cfg: DictConfig, kind: str, records: list[dict]) -> list[dict]:
    if kind == "base":
        return _outputs(cfg, cfg.base.model, cfg.base.name, records)
    if kind == "reference":  # the eval set's own outputs: the public leaderboard's protocol
        return [{k: r[k] for k in ("instruction", "output", "generator", "dataset")} for r in records]
    raise ValueError(f"eval.baselines entries are 'base' or 'reference', not {kind!r}")


def _sanity(cfg: DictConfig, judge, eval_set: list[dict], annotations) -> dict:
    s = cfg.eval.sanity
    strong = eval_set if s.strong_path == cfg.eval.eval_set.path else load_eval_set(s.strong_path, HUB_V2)
    report = sanity_report(judge, strong, load_eval_set(s.weak_path, HUB_V1), s.n_pairs, s.seed)
    if annotations is not None:
        report["evaluation_pairs"] = eval_pair_stats(annotations)
    return report


def eval_records(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """(the whole eval set, the instructions evaluated: all, or k per subset)."""
    eval_set = load_eval_set(cfg.eval.eval_set.path, HUB_V2)
    return eval_set, stratified_subset(eval_set, cfg.eval.subset.k_per_subset, cfg.eval.subset.seed)


def generate_only(cfg: DictConfig, spec: str, name: str) -> list[dict]:
    """The generation half of `evaluate` (a DVC stage of its own): model_outputs of one model."""
    set_chat_date(cfg.model.chat_date)
    return _outputs(cfg, spec, name, eval_records(cfg)[1])


def evaluate(cfg: DictConfig) -> dict:
    validate(cfg, "evaluate")
    start, e, out = time.perf_counter(), cfg.eval, Path(cfg.out_dir)
    set_chat_date(cfg.model.chat_date)  # every generation and local-judge prompt renders with it
    eval_set, records = eval_records(cfg)
    spec, name = candidate_model(cfg)
    candidate = _outputs(cfg, spec, name, records)
    judge = instantiate(e.judge)
    index = {r["instruction"]: i for i, r in enumerate(eval_set)} if len(eval_set) == ALPACA_EVAL_SIZE else None
    metrics: dict = {
        "candidate": {"model": spec, "generator": name},
        "base": {"model": cfg.base.model, "generator": cfg.base.name},
        "eval_set": {"path": e.eval_set.path, "n_total": len(eval_set), "n_evaluated": len(records),
                     "k_per_subset": e.subset.k_per_subset, "seed": e.subset.seed},
        "generation": OmegaConf.to_container(e.generation, resolve=True),
        "judge": judge.describe(),
    }
    annotations = None
    for kind in e.baselines:
        baseline = _baseline(cfg, kind, records)
        metrics[f"vs_{kind}"], ann = score_head2head(candidate, baseline, judge, out / f"vs_{kind}",
                                                     index, e.length_controlled)
        annotations = ann if annotations is None else annotations
    if e.sanity.enabled:
        sanity = _sanity(cfg, judge, eval_set, annotations)
        atomic_write_json(out / "sanity.json", sanity)
        metrics["sanity"] = {k: v for k, v in sanity.items() if k != "annotations"}
        print(format_sanity(sanity, judge.describe()["annotator"]))
    metrics["seconds_total"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / "details.json", metrics)
    publish_figures(headline.alpaca_figures(metrics), cfg.get("metrics_file") or out / "metrics.json",
                    cfg.get("logger"), "alpaca_eval")
    print(summary(metrics))
    _log(cfg, name, metrics)
    return metrics


def summary(metrics: dict) -> str:
    lines = []
    for key in (k for k in metrics if k.startswith("vs_")):
        m = metrics[key]
        lines.append(f"{metrics['candidate']['generator']} {key}: win rate {m['overall']['win_rate']:.1f}"
                     f" (ties as loss {m['overall']['win_rate_ties_as_loss']:.1f}), n={m['overall']['n_total']}")
        lines += [f"  {s}: {b['win_rate']:.1f} ({b['win_rate_ties_as_loss']:.1f}) n={b['n_total']}"
                  for s, b in m["subsets"].items()]
        lc = m["length_controlled"]
        lines.append(f"  LC win rate: {lc['length_controlled_winrate']:.1f}" if lc["available"]
                     else f"  LC win rate: unavailable ({lc['reason']})")
    return "\n".join(lines)


def _log(cfg: DictConfig, name: str, metrics: dict) -> None:
    flat = flatten({k: v for k, v in metrics.items() if k not in ("generation", "eval_set")}, "eval/")
    headline = metrics.get("vs_base", {}).get("overall", {})
    flat.update({f"eval/{k}": v for k, v in headline.items() if k.startswith("win_rate") and v is not None})
    params = {"candidate": metrics["candidate"]["model"], "base": cfg.base.model,
              "judge": metrics["judge"]["annotator"], "judge_model": metrics["judge"].get("model"),
              "k_per_subset": cfg.eval.subset.k_per_subset, "n_evaluated": metrics["eval_set"]["n_evaluated"],
              **{f"generation.{k}": v for k, v in metrics["generation"].items()}}
    out = Path(cfg.out_dir)
    log_run(cfg.get("logger"), (cfg.get("logger") or {}).get("run_name") or f"evaluate_{name}", params,
            flat, [out / "details.json", out / "sanity.json", out / "vs_base" / "annotations.json"],
            tags={"lsp.stage": "evaluate", "lsp.candidate": name})
    marker = Path(metrics["candidate"]["model"]) / CHECKPOINT_MARKER
    if marker.is_file():  # a trainer checkpoint: its training run gets the headline numbers too
        info = json.loads(marker.read_text())
        headline = {k: v for k, v in flat.items() if k.count("/") == 1 or "/overall/" in k or
                    k.endswith("/win_rate") or k.endswith("/win_rate_ties_as_loss")}
        log_to_existing_run(cfg.get("logger"), info.get("mlflow_run_id"), headline, int(info["step"]))
