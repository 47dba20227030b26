"""Reward sources behind one small interface: `score(instructions, responses) -> RewardOutput`.

Every source is built by Hydra `_target_` with `pool` (an `lsp.models.ModelPool`) injected by the
trainer, so a judge that names the reference model shares its weights. All forward passes run
batched (`batch_size` rows) under `torch.inference_mode`; values come back as a (B,) float32 CPU
tensor.

- `SequenceClassifierReward`: a reward model such as Skywork-Reward-V2-Llama-3.2-3B, used as its
  model card does: [user instruction, assistant response] through the RM's chat template
  (tokenize=False), tokenised with add_special_tokens=False (the template already holds any BOS),
  reward = logits[:, 0]. Rows are RIGHT-padded with the model's `config.pad_token_id`, so the
  classifier's "rightmost non-pad token" pooling picks exactly the token it picks for the row
  alone, whatever the padding side of the shared tokenizer and even when pad == eos; positions are
  unaffected by right padding for any architecture. A model without a pad id gets the tokenizer's.
- `LLMJudgeReward` (offline default): any causal LM judges with `REWARD_JUDGE_PROMPT`; the
  assistant turn is prefilled with `answer_prefix` ("Score: ") so the next token is the digit.
  One forward pass per batch, reading only the last position (rows LEFT-padded, position ids from
  the attention mask). Reward = expected value of the next-token distribution renormalised over
  '0'..'9': continuous in [0, 9]. There is nothing to parse; a row is flagged `parse_failed` when
  the judge puts less than `min_score_mass` (0.01) of its probability on the digit tokens (it
  wanted to say something else), and its expected value is still returned.
- `QualitySelfReward` (R_Q, range 0..7) with `QUALITY_JUDGE_PROMPT`:
  `mode="generate"` (default, the paper's): greedy generation of justification, calculation and
  score, then `parse_quality_score`; unparseable rows get the fallback value, `parse_failed` True
  and their text in `raw`. `mode="logits"` (our cheaper option for CPU runs: one forward pass
  instead of up to `max_new_tokens` decoding steps; SmolLM2-135M also rarely completes the rubric
  format within 128 tokens) skips the justification and calculation: the assistant turn is
  prefilled with "<Score>" and the reward is the expected value over '0'..'7', as in
  `LLMJudgeReward` (continuous, not an integer as in the paper).
  `fallback` (paper silent): "group_mean" (default) = mean of the parsed rows of the same group
  (the G answers to one query; `score(..., group_size=G)`), the midpoint 3.5 when none of the
  group parsed: an unparseable verdict carries no information, and its group's mean adds exactly
  nothing to that group's mean-subtracted Solver advantages (a batch mean would: a group
  [6, 6, 6, fail] with a batch mean of 3 became [6, 6, 6, 3], advantages +0.75 x 3 and -2.25),
  and, depending on the group only, it keeps 1-process and W-process updates equal;
  "midpoint" = 3.5; "zero" = 0 (punishes the Solver for the judge's failure).
- `LengthReward`: `per_char * len(response)`, no model. A trivial deterministic reward for
  benchmarks (benchmarks/bench_step.py gives TRL's GRPOTrainer exactly this function) and tests;
  it teaches nothing useful.
Long inputs (all sources): a rendered row longer than `max_length` tokens is shortened in the
TEXT first, cutting the end of the response (keeping its start; then of the instruction if the
response alone is not enough) and marking the cut with " [...]", so the rubric, the tags and the
judge's answer slot survive. Any small excess left by re-tokenisation is then cut from the START
of the token sequence, keeping the answer slot (classifier: the last token). In generate mode the
prompt budget is `max_length - max_new_tokens` and only the text cut applies (prompts go to
`lsp.engines.own.generate` as strings). Judges pass `logits_to_keep=1` (transformers causal LMs) so
only the last position's (B, V) logits are ever materialised.
The score digits must be single tokens and tokenise the same after the prefix as alone
(`score_token_ids` checks this once and raises a clear error otherwise).
`amp` ("bfloat16"/None): optional autocast for the forward passes (the weights keep `dtype`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from lsp.chat import render_chat, render_exchange
from lsp.config import PosInt
from lsp.engines.sampling import SamplingConfig
from lsp.models import ModelPool, autocast, dtype_of, resolve_model
from lsp.selfplay.prompts import (
    QUALITY_MAX_SCORE,
    REWARD_MAX_SCORE,
    parse_quality_score,
    render_quality_prompt,
    render_reward_judge_prompt,
)
from lsp.selfplay.records import RewardOutput

CUT_MARK = " [...]"
CUT_MARGIN = 4  # tokens: re-tokenising cut text can shift a boundary by a few tokens
Fallback = Literal["group_mean", "midpoint", "zero"]
FALLBACKS = get_args(Fallback)
# The config schema (lsp.config) checks a reward's keys against these signatures' annotations.
Dtype = Literal["float32", "bfloat16", "float16"]
Amp = Literal["auto", "bfloat16", "none"] | None
EngineName = Literal["lsp", "hf", "vllm"]

Render = Callable[[str, str], str]  # (instruction, response) -> the full model input text


class RewardSource(Protocol):
    name: str

    def score(self, instructions: list[str], responses: list[str]) -> RewardOutput: ...


# ---------------------------------------------------------------- pure maths


def expected_score(logits: Tensor, score_token_ids: Tensor, values: Tensor) -> Tensor:
    """(B, V) next-token logits -> (B,) expected value, renormalised over the K score tokens.

    score_token_ids: (K,) token ids; values: (K,) the score each token stands for.
    """
    probs = torch.softmax(logits.float()[:, score_token_ids], dim=-1)  # (B, K)
    return probs @ values.float().to(probs.device)


def score_mass(logits: Tensor, score_token_ids: Tensor) -> Tensor:
    """(B, V) logits -> (B,) total probability of the score tokens under the full softmax."""
    return torch.softmax(logits.float(), dim=-1)[:, score_token_ids].sum(-1)


def fill_unparsed(values: Tensor, parsed: Tensor, mode: str, max_score: float,
                  group_size: int | None = None) -> Tensor:
    """(B,) values, (B,) bool parsed -> values with the fallback where not parsed (module doc).

    group_mean: rows are B / group_size consecutive groups (the whole call is one group when
    group_size is None); each failed row gets the mean of its group's parsed rows, the midpoint
    when none of them parsed.
    """
    if mode not in FALLBACKS:
        raise ValueError(f"Unknown fallback '{mode}': use one of {FALLBACKS}")
    if mode != "group_mean":
        fallback = 0.0 if mode == "zero" else max_score / 2
        return torch.where(parsed, values, torch.full_like(values, fallback))
    g = group_size or values.numel()
    if values.numel() % g:
        raise ValueError(f"{values.numel()} scores do not split into groups of {g}")
    ok = parsed.view(-1, g)  # (B/G, G)
    sums = torch.where(ok, values.view(-1, g), 0.0).sum(1)  # (B/G,)
    count = ok.sum(1)
    means = torch.where(count > 0, sums / count.clamp_min(1), max_score / 2)  # (B/G,)
    return torch.where(parsed, values, means.repeat_interleave(g))


# ---------------------------------------------------------------- tokenisation helpers


def score_token_ids(tokenizer, prefix: str, max_score: int) -> Tensor:
    """(max_score + 1,) ids of the digit tokens '0'.. that follow `prefix` as single tokens."""
    base = tokenizer.encode(prefix, add_special_tokens=False)
    ids = []
    for digit in map(str, range(max_score + 1)):
        alone = tokenizer.encode(digit, add_special_tokens=False)
        after = tokenizer.encode(prefix + digit, add_special_tokens=False)
        if len(alone) != 1 or after != base + alone:
            raise ValueError(
                f"The judge tokenizer does not give '{digit}' as one token after {prefix!r} "
                f"({alone} alone, {after} after the prefix): pick another answer prefix."
            )
        ids.append(alone[0])
    return torch.tensor(ids)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _cut_end(tokenizer, text: str, n: int) -> tuple[str, int]:
    """Drop enough end tokens of text for it to shrink by n tokens once the cut is marked;
    returns (text, tokens still to cut elsewhere)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if n <= 0 or not ids:
        return text, max(n, 0)
    n += _n_tokens(tokenizer, CUT_MARK)
    keep = max(len(ids) - n, 0)
    return tokenizer.decode(ids[:keep]) + CUT_MARK, n - (len(ids) - keep)


def fit_pair(tokenizer, render: Render, instruction: str, response: str, max_length: int):
    """Shorten (instruction, response) so render(...) fits max_length tokens (module doc)."""
    excess = _n_tokens(tokenizer, render(instruction, response)) - max_length
    if excess <= 0:
        return instruction, response
    response, left = _cut_end(tokenizer, response, excess + CUT_MARGIN)
    instruction, _ = _cut_end(tokenizer, instruction, left)
    return instruction, response


def render_rows(tokenizer, render: Render, instructions, responses, max_length) -> list[str]:
    pairs = zip(instructions, responses, strict=True)
    return [render(*fit_pair(tokenizer, render, i, r, max_length)) for i, r in pairs]


def encode_padded(tokenizer, texts: list[str], max_length: int, pad_id: int, left: bool):
    """texts -> (input_ids (B, T), attention_mask (B, T)); each row keeps its last max_length
    tokens; padding on the left (judges: answer slot in the last column) or the right."""
    rows = [ids[-max_length:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, cols] = torch.tensor(row, dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def _chunks(items: list, size: int):
    return (items[i : i + size] for i in range(0, len(items), size))


def _amp(amp: str | None) -> torch.dtype | None:
    return None if amp in (None, "none") else dtype_of(amp)


def last_token_logits(model, tokenizer, texts: list[str], max_length: int, amp=None) -> Tensor:
    """One forward pass over left-padded texts -> (B, V) float32 logits of the next token."""
    ids, mask = encode_padded(tokenizer, texts, max_length, tokenizer.pad_token_id, left=True)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    with torch.inference_mode(), autocast(model.device, amp):
        out = model(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
            position_ids=position_ids.to(model.device), logits_to_keep=1,
        )
    return out.logits[:, -1].float().cpu()


# ---------------------------------------------------------------- reward sources


class SequenceClassifierReward:
    name = "sequence_classifier"

    def __init__(self, pool: ModelPool, model: str, dtype: Dtype = "float32", batch_size: PosInt = 8,
                 max_length: PosInt = 2048, amp: Amp = None):
        self.model, self.tokenizer = pool.sequence_classifier(model, dtype)
        config = self.model.config.get_text_config()
        if config.pad_token_id is None:  # HF refuses batches without one (see module doc)
            config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = config.pad_token_id
        self.batch_size, self.max_length, self.amp = batch_size, max_length, _amp(amp)

    def _render(self, instruction: str, response: str) -> str:
        return render_exchange(self.tokenizer, instruction, response)

    def _forward(self, texts: list[str]) -> Tensor:  # (b,)
        ids, mask = encode_padded(self.tokenizer, texts, self.max_length, self.pad_id, left=False)
        with torch.inference_mode(), autocast(self.model.device, self.amp):
            logits = self.model(input_ids=ids.to(self.model.device),
                                attention_mask=mask.to(self.model.device)).logits
        return logits[:, 0].float().cpu()

    def score(self, instructions: list[str], responses: list[str]) -> RewardOutput:
        texts = render_rows(self.tokenizer, self._render, instructions, responses, self.max_length)
        values = torch.cat([self._forward(c) for c in _chunks(texts, self.batch_size)])
        return RewardOutput(values=values, parse_failed=torch.zeros(len(texts), dtype=torch.bool))


class _DigitJudge:
    """A causal-LM judge read through the expected value of its next score-digit token."""

    def __init__(self, pool: ModelPool, model: str, dtype: str, batch_size: int, max_length: int,
                 prefix: str, max_score: int, min_score_mass: float, amp: str | None):
        self.model, self.tokenizer = pool.causal_lm(model, dtype)
        self.prefix, self.max_score, self.min_score_mass = prefix, max_score, min_score_mass
        self.token_ids = score_token_ids(self.tokenizer, prefix, max_score)  # (K,)
        self.batch_size, self.max_length, self.amp = batch_size, max_length, _amp(amp)

    def _user_message(self, instruction: str, response: str) -> str:
        raise NotImplementedError

    def _render(self, instruction: str, response: str) -> str:
        # The prefix is appended to the rendered prompt, not sent through the chat template, which
        # could close the assistant turn or trim trailing spaces (Llama-3 trims contents).
        return render_chat(self.tokenizer, self._user_message(instruction, response)) + self.prefix

    def _judge(self, instructions: list[str], responses: list[str]) -> RewardOutput:
        texts = render_rows(self.tokenizer, self._render, instructions, responses, self.max_length)
        logits = torch.cat([
            last_token_logits(self.model, self.tokenizer, c, self.max_length, self.amp)
            for c in _chunks(texts, self.batch_size)
        ])  # (B, V)
        values = expected_score(logits, self.token_ids, torch.arange(self.max_score + 1.0))
        failed = score_mass(logits, self.token_ids) < self.min_score_mass
        return RewardOutput(values=values, parse_failed=failed)


class LLMJudgeReward(_DigitJudge):
    name = "llm_judge"

    def __init__(self, pool: ModelPool, model: str, dtype: Dtype = "float32", batch_size: PosInt = 8,
                 max_length: PosInt = 2048, answer_prefix: str = "Score: ",
                 min_score_mass: float = 0.01, amp: Amp = None):
        super().__init__(pool, model, dtype, batch_size, max_length, answer_prefix,
                         REWARD_MAX_SCORE, min_score_mass, amp)

    def _user_message(self, instruction: str, response: str) -> str:
        return render_reward_judge_prompt(instruction, response)

    def score(self, instructions: list[str], responses: list[str]) -> RewardOutput:
        return self._judge(instructions, responses)


class QualitySelfReward(_DigitJudge):
    name = "quality_self_reward"

    def __init__(self, pool: ModelPool, model: str, dtype: Dtype = "float32",
                 mode: Literal["logits", "generate"] = "generate", batch_size: PosInt = 8,
                 max_new_tokens: PosInt = 256, fallback: Fallback = "group_mean",
                 max_length: PosInt = 2048, min_score_mass: float = 0.01, amp: Amp = None,
                 engine: EngineName = "lsp"):
        super().__init__(pool, model, dtype, batch_size, max_length, "<Score>",
                         QUALITY_MAX_SCORE, min_score_mass, amp)
        self.mode, self.max_new_tokens, self.fallback = mode, max_new_tokens, fallback
        # generate mode decodes with `engine` (lsp.engines: lsp | hf | vllm), never pushed: the
        # judge is frozen. The name also goes into every SamplingConfig: `lsp` and `hf` share one
        # engine object, which decodes with the loop the config names.
        self.engine_name = engine
        self.engine = judge_engine(pool, engine, model, dtype, self.amp) if mode == "generate" else None

    def _user_message(self, instruction: str, response: str) -> str:
        return render_quality_prompt(instruction, response)

    def score(self, instructions: list[str], responses: list[str],
              group_size: int | None = None) -> RewardOutput:
        """group_size: the answers per query (consecutive rows), for the group_mean fallback."""
        if self.mode == "logits":
            return self._judge(instructions, responses)
        return self._generate(instructions, responses, group_size)

    def _generate(self, instructions: list[str], responses: list[str],
                  group_size: int | None) -> RewardOutput:
        def render(i: str, r: str) -> str:
            return render_chat(self.tokenizer, render_quality_prompt(i, r))

        budget = max(self.max_length - self.max_new_tokens, 1)
        prompts = render_rows(self.tokenizer, render, instructions, responses, budget)
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                             engine=self.engine_name)
        texts = self.engine.generate(prompts, cfg, greedy=True).completions
        return quality_scores(texts, self.max_score, self.fallback, group_size)


def group_kwargs(source, group_size: int) -> dict:
    """`group_size` for a self-reward whose `score` takes it (QualitySelfReward: the fallback of an
    unparsable verdict is its group's mean); a source with the plain `score(instructions,
    responses)` of lsp.selfplay.rewards.RewardSource gets nothing more."""
    return {"group_size": group_size} if "group_size" in inspect.signature(source.score).parameters else {}


def quality_scores(texts: list[str], max_score: int, fallback: str,
                   group_size: int | None = None) -> RewardOutput:
    """The judge's texts -> scores: `parse_quality_score`, then the fallback for the rows that
    did not parse (module doc); every value is finite and in [0, max_score]."""
    scores = [parse_quality_score(t, max_score) for t in texts]
    parsed = torch.tensor([s is not None for s in scores], dtype=torch.bool)  # (B,)
    values = torch.tensor([float(s or 0) for s in scores], dtype=torch.float32)
    values = fill_unparsed(values, parsed, fallback, max_score, group_size)
    return RewardOutput(values=values, parse_failed=~parsed, raw=list(texts))


def judge_engine(pool: ModelPool, kind: str, spec: str, dtype: str, amp: torch.dtype | None):
    """The generation engine (lsp.engines) of the frozen judge `spec`: from the run's engine
    pool, so a judge and the reference that name one model share one engine; never pushed."""
    from lsp.engines import EnginePool

    if pool.engines is None:
        pool.engines = EnginePool(pool.device)
    model, tokenizer = pool.causal_lm(spec, dtype)
    return pool.engines.get(kind, model, tokenizer, resolve_model(spec, pool.cache_dir), dtype, amp)


class LengthReward:
    name = "length"

    def __init__(self, pool: ModelPool | None = None, per_char: float = 0.01,
                 model: str | None = None):
        # pool and model are accepted and ignored, so the config shape matches the others.
        self.per_char = per_char

    def score(self, instructions: list[str], responses: list[str]) -> RewardOutput:
        values = torch.tensor([self.per_char * len(r) for r in responses], dtype=torch.float32)
        return RewardOutput(values=values, parse_failed=torch.zeros(len(responses), dtype=torch.bool))
