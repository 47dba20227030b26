"""A local Hugging Face causal LM as an alpaca-eval pairwise judge, deciding from token probabilities.

How it plugs into alpaca-eval: `annotator_kwargs()` gives `alpaca_eval.evaluate` /
`PairwiseAnnotator` the shipped evaluator config (`annotators/lsp_local_judge/configs.yaml`), a
caching path named after the judge's fingerprint, and this object as `fn_completions`. alpaca-eval
then does what it does for any judge: joins outputs, skips identical pairs (tie), looks pairs up in
its annotation cache (keyed by instruction, output_1, output_2, annotator) and calls the judge only
for the rest, parses the JSON answer, stores it. A second identical run therefore judges nothing.

The decision (our design; the paper used a strong API/served judge): the judge's prompt
(`judge_prompt.txt`) asks "Which answer is better, 1 or 2?"; we read the next-token probabilities of
"1" and "2" (renormalised over the two) instead of sampling text, in BOTH presentation orders:
p12 = P(output_1 better) with output_1 shown first, p21 = the same with output_1 shown second.
A position bias b adds to the log-odds of whichever answer is shown first: logit(p12) = s + b,
logit(p21) = s - b, so their mean s is the judge's preference with the bias cancelled.
- `debiased` (default): output_1 if s > tie_margin, output_2 if s < -tie_margin, else a tie.
- `weighted`: preference = 2 - sigmoid(s), alpaca-eval's weighted convention (no ties).
- `agreement`: each order votes on its own; a tie unless both votes agree (strict; a judge as
  position-biased as SmolLM2-135M then ties on nearly every pair).
`flipped` (the two orders' own votes disagree) is stored for every pair: the order-flip rate.
Responses longer than `max_response_tokens` judge tokens are cut (marked "[...]") to bound cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lsp.config import PosInt
from lsp.models import amp_dtype, resolve_device

CONFIG_DIR = Path(__file__).parent / "annotators" / "lsp_local_judge"
JUDGE_PROMPT = CONFIG_DIR / "judge_prompt.txt"
ANNOTATOR_NAME = "lsp_local_judge"
_RECORD = re.compile(r"(?:^|\n)<<<lsp-judge:(instruction|output_1|output_2)>>>\n")
_SLOTS = re.compile(r"\{(instruction|response_1|response_2)\}")
JUDGE_VERSION = 2  # bump when the decision code changes: it is part of the cache fingerprint


def parse_pair_record(prompt: str) -> tuple[str, str, str]:
    """(instruction, output_1, output_2) from the record alpaca-eval formatted (pair_record.txt)."""
    parts = _RECORD.split(prompt)
    if len(parts) != 7 or parts[1::2] != ["instruction", "output_1", "output_2"]:
        raise ValueError("not an lsp judge pair record (or an output contains its markers)")
    return parts[2], parts[4], parts[6]


Decision = Literal["debiased", "weighted", "agreement"]


def _logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def _try_parse(prompt: str) -> tuple[str, str, str] | None:
    try:
        return parse_pair_record(prompt)
    except ValueError:
        return None


@dataclass
class PairVerdict:
    p12: float  # P(output_1 better), output_1 shown first
    p21: float  # P(output_1 better), output_1 shown second
    p_valid: float  # mean probability mass the judge put on the two answer tokens

    @property
    def log_odds(self) -> float:
        """Debiased log-odds that output_1 is better: the first-position bias cancels."""
        return (_logit(self.p12) + _logit(self.p21)) / 2

    @property
    def votes(self) -> tuple[int, int]:
        """+1 output_1, -1 output_2, 0 undecided; one vote per presentation order."""
        return _vote(self.p12), _vote(self.p21)

    @property
    def flipped(self) -> bool:  # the presentation order changed the verdict
        return self.votes[0] != self.votes[1]

    def preference(self, decision: str, tie_margin: float = 0.0) -> float:
        """alpaca-eval's preference: 1 output_1 better, 2 output_2 better, 1.5 tie."""
        s = self.log_odds
        if decision == "weighted":
            return 2.0 - 1.0 / (1.0 + math.exp(-s))
        if decision == "agreement":
            total = sum(self.votes)
            return 1.0 if total == 2 else 2.0 if total == -2 else 1.5
        return 1.0 if s > tie_margin else 2.0 if s < -tie_margin else 1.5

    def completion(self, decision: str, tie_margin: float = 0.0) -> str:
        return json.dumps({
            "preference": self.preference(decision, tie_margin), "log_odds": self.log_odds,
            "p12": self.p12, "p21": self.p21, "p_valid": self.p_valid, "flipped": self.flipped,
        })


def _vote(p: float) -> int:
    return 1 if p > 0.5 else -1 if p < 0.5 else 0


def order_flipped(annotation: dict) -> bool | None:
    """Whether the two presentation orders disagreed, from a stored annotation (None: unknown, e.g.
    identical outputs that alpaca-eval tied without asking the judge)."""
    raw = annotation.get("preference_raw_completion")
    if not isinstance(raw, str):
        return None
    try:
        return bool(json.loads(raw)["flipped"])
    except (ValueError, KeyError, TypeError):
        return None


class LocalHFJudge:
    """Pairwise judge from any local causal LM (default: the embedded SmolLM2-135M-Instruct)."""

    reports_both_orders = True

    def __init__(
        self, model: str = "embedded:smollm2-135m-instruct", dtype: str = "float32",
        amp: str = "none", device: str = "auto", batch_size: PosInt = 4,
        max_instruction_tokens: PosInt = 256, max_response_tokens: PosInt = 512,
        decision: Decision = "debiased", tie_margin: float = 0.0,
        answer_tokens: tuple[str, str] = ("1", "2"), answer_prefix: str = "", prompt_file: str | None = None,
        cache_dir: str = "artifacts/judge_cache", model_cache_dir: str | None = None,
        chunksize: PosInt = 16,
    ):
        self.model_spec, self.dtype, self.amp = model, dtype, amp
        self.device = resolve_device(device)
        self.batch_size, self.decision, self.tie_margin = batch_size, decision, tie_margin
        self.max_instruction_tokens, self.max_response_tokens = max_instruction_tokens, max_response_tokens
        self.answer_tokens, self.answer_prefix = tuple(answer_tokens), answer_prefix
        self.template = Path(prompt_file or JUDGE_PROMPT).read_text(encoding="utf-8").strip()
        self.cache_dir, self.model_cache_dir, self.chunksize = Path(cache_dir), model_cache_dir, chunksize
        self.n_pairs = 0  # pairs actually put through the model (both orders each)
        self.seconds = 0.0  # wall time spent judging them (model loading excluded)
        self.load_seconds = 0.0
        self._model = self._tok = self._ids = None

    # --- alpaca-eval integration -------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Names the cache: a change of model, prompt or decision never reuses old verdicts."""
        keys = [self.model_spec, self.dtype, self.amp, self.max_instruction_tokens,
                self.max_response_tokens, self.decision, self.tie_margin, self.answer_tokens,
                self.answer_prefix, self.template, JUDGE_VERSION]
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:12]

    @property
    def caching_path(self) -> Path:
        return self.cache_dir / f"{ANNOTATOR_NAME}_{self.fingerprint}.json"

    def annotator_kwargs(self) -> dict:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return {"annotators_config": str(CONFIG_DIR), "caching_path": str(self.caching_path),
                "fn_completions": self}

    def describe(self) -> dict:
        return {"kind": "local_hf", "annotator": ANNOTATOR_NAME, "model": self.model_spec,
                "decision": self.decision, "fingerprint": self.fingerprint,
                "cache": str(self.caching_path)}

    def __call__(self, prompts: list[str], **_: object) -> dict:
        """alpaca-eval's `fn_completions`: one JSON verdict per formatted pair record."""
        start = time.perf_counter()
        triples = [_try_parse(p) for p in prompts]
        ok = [t for t in triples if t is not None]
        verdicts = iter(self.judge([t[0] for t in ok], [t[1] for t in ok], [t[2] for t in ok]) if ok else [])
        # An unreadable record gets an empty completion: alpaca-eval's parser stores it as missing.
        completions = ["" if t is None else next(verdicts).completion(self.decision, self.tie_margin)
                       for t in triples]
        per_pair = (time.perf_counter() - start) / max(len(prompts), 1)
        return {"completions": completions, "time_per_example": [per_pair] * len(prompts),
                "price_per_example": [0.0] * len(prompts)}

    # --- judging --------------------------------------------------------------------------------
    def judge(self, instructions: list[str], outputs_1: list[str], outputs_2: list[str]) -> list[PairVerdict]:
        self._load()
        start = time.perf_counter()
        prompts = []
        for q, a, b in zip(instructions, outputs_1, outputs_2, strict=True):
            prompts += [self._prompt(q, a, b), self._prompt(q, b, a)]  # order 12, then order 21
        p_first, p_valid = self._p_first(prompts)  # (2B,): P("1") / (P("1") + P("2"))
        verdicts = [
            PairVerdict(p12=float(p_first[2 * i]), p21=float(1 - p_first[2 * i + 1]),
                        p_valid=float((p_valid[2 * i] + p_valid[2 * i + 1]) / 2))
            for i in range(len(instructions))
        ]
        self.n_pairs += len(verdicts)
        self.seconds += time.perf_counter() - start
        print(f"[judge] {self.n_pairs} pairs judged ({self.seconds / self.n_pairs:.1f} s per pair, "
              "both orders)", flush=True)
        return verdicts

    def _load(self) -> None:
        if self._model is not None:  # loaded lazily: a fully cached run never loads the judge
            return
        from lsp.models import load_causal_lm, load_tokenizer, resolve_model

        start = time.perf_counter()
        path = resolve_model(self.model_spec, self.model_cache_dir)
        self._model = load_causal_lm(path, self.dtype, self.device)
        self._tok = load_tokenizer(path)
        self._ids = [self._single_token(t) for t in self.answer_tokens]
        self.load_seconds = time.perf_counter() - start

    def _single_token(self, text: str) -> int:
        ids = self._tok(self.answer_prefix + text, add_special_tokens=False)["input_ids"]
        prefix = self._tok(self.answer_prefix, add_special_tokens=False)["input_ids"]
        if len(ids) != len(prefix) + 1 or ids[: len(prefix)] != prefix:
            raise ValueError(f"answer token {text!r} is not one token after {self.answer_prefix!r}")
        return ids[-1]

    def _truncate(self, text: str, max_tokens: int) -> str:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self._tok.decode(ids[:max_tokens]) + " [...]"

    def _prompt(self, instruction: str, first: str, second: str) -> str:
        from lsp.chat import render_chat

        values = {
            "instruction": self._truncate(instruction, self.max_instruction_tokens),
            "response_1": self._truncate(first, self.max_response_tokens),
            "response_2": self._truncate(second, self.max_response_tokens),
        }
        user = _SLOTS.sub(lambda m: values[m.group(1)], self.template)  # one pass: no re-substitution
        return render_chat(self._tok, user) + self.answer_prefix

    @torch.inference_mode()
    def _p_first(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(first answer token) renormalised over both, mass on both), each (len(prompts),)."""
        lengths = [len(self._tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lengths.__getitem__)  # similar lengths share a batch
        p_first, p_valid = torch.empty(len(prompts)), torch.empty(len(prompts))
        step = 2 * self.batch_size
        for i in range(0, len(order), step):
            idx = order[i : i + step]
            logp = self._last_logprobs([prompts[j] for j in idx])  # (b, 2)
            p_first[idx] = torch.softmax(logp, dim=-1)[:, 0]
            p_valid[idx] = logp.exp().sum(-1)
        return p_first, p_valid

    def _last_logprobs(self, prompts: list[str]) -> torch.Tensor:
        from lsp.models import autocast

        enc = self._tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self._model.device)
        # Left padding: positions must start at 0 on the first real token of every row.
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with autocast(self._model.device, amp_dtype(self.amp, self.device)):
            out = self._model(**enc, position_ids=position_ids, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return logp[:, self._ids]  # (b, 2)
