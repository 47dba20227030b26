"""KL(pi || pi_ref) of trained checkpoints, measured with many more samples than a training step has.

    .venv/bin/python benchmarks/kl_probe.py CKPT [CKPT ...] [--samples 32] [--seed 0]

A training step's `kl/challenger` is the sampled sequence log-ratio of its N = 4 queries: unbiased,
but too noisy to compare runs by. For each checkpoint this samples `--samples` Challenger queries
(the training Challenger prompt) and `--samples` Solver answers (to the project's own validation
prompts, never an evaluation set), at temperature 1 as in training, and reports the mean sequence
log-ratio log pi(y) - log pi_ref(y) with its standard error: an unbiased estimate of the sequence KL
of each role. The reference is the checkpoint run's `model.reference`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lsp.chat import DEFAULT_CHAT_DATE, render_chat, set_chat_date
from lsp.engines.own import generate
from lsp.engines.sampling import SamplingConfig
from lsp.evaluation.selection import load_validation_prompts
from lsp.models import load_causal_lm, load_tokenizer, resolve_model
from lsp.selfplay.logprobs import completion_logprobs, masked_sum
from lsp.selfplay.prompts import DEFAULT_TASK, DEFAULT_TEMPLATE, render_challenger_prompt


def sequence_log_ratios(policy, reference, rollout) -> list[float]:
    args = (rollout.sequences, rollout.attention_mask, rollout.prompt_len)
    with torch.no_grad():
        lp, ref = completion_logprobs(policy, *args), completion_logprobs(reference, *args)
    return masked_sum(lp - ref, rollout.completion_mask, dim=-1).tolist()  # (B,)


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def probe(ckpt: Path, samples: int, seed: int) -> dict:
    cfg = OmegaConf.load(ckpt.parent.parent / "config.yaml")
    set_chat_date(OmegaConf.select(cfg, "model.chat_date", default=DEFAULT_CHAT_DATE))
    policy, tok = load_causal_lm(str(ckpt)), load_tokenizer(str(ckpt))
    reference = load_causal_lm(resolve_model(cfg.model.reference, cfg.model.cache_dir))
    prompt = render_challenger_prompt(cfg.rollout.task or DEFAULT_TASK,
                                      cfg.rollout.template or DEFAULT_TEMPLATE)
    validation, _ = load_validation_prompts(None)
    roles = {
        "challenger": ([render_chat(tok, prompt)] * samples, cfg.rollout.challenger),
        "solver": ([render_chat(tok, q) for q in (validation * samples)[:samples]], cfg.rollout.solver),
    }
    out = {"checkpoint": str(ckpt), "beta": cfg.algo.beta, "kl_placement": cfg.algo.kl_placement}
    for role, (prompts, sampling) in roles.items():
        torch.manual_seed(seed)
        sc = SamplingConfig(max_new_tokens=sampling.max_new_tokens, batch_size=16)
        ratios = sequence_log_ratios(policy, reference, generate(policy, tok, prompts, sc))
        out[f"kl/{role}"], out[f"kl/{role}_se"] = mean_se(ratios)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for ckpt in args.checkpoints:
        r = probe(ckpt, args.samples, args.seed)
        print(json.dumps(r))
        print(f"{ckpt}: beta={r['beta']} placement={r['kl_placement']} "
              f"KL challenger {r['kl/challenger']:.3f} +- {r['kl/challenger_se']:.3f}, "
              f"solver {r['kl/solver']:.3f} +- {r['kl/solver_se']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
