"""Prompt templates of the game and of the judges, their rendering, and parsing of judge output.

Everything here is plain text in, plain text out: applying a model's chat template is the caller's
job (`lsp.chat.render_chat`).

Challenger prompt (`CHALLENGER_PROMPT`): our own wording of the paper's four parts (background
with two examples, request, details with a template between markers, rules). Choices where the
paper is silent:
- `DEFAULT_TASK` / `DEFAULT_TEMPLATE`: the paper's AlpacaEval runs do not give their values. We
  use general instruction following and a one-placeholder template asking for "an instruction a
  user would send to an AI assistant", which is what AlpacaEval's test prompts are.
- Rendering substitutes `{task}` and `{template}` in ONE regex pass (not `str.format`), so user
  templates may contain any braces, and a task text containing "{template}" is not re-expanded.

Degenerate-query rule (`check_queries`): each raw Challenger output is cleaned (whitespace, any
leftover start/end markers, one pair of surrounding quotes or backticks), then checked in this
order, the first rule that fires giving the reason:
- "empty": nothing left after cleaning;
- "too_long": more than `max_chars` characters;
- "truncated": generation hit max_new_tokens before EOS (only with `reject_truncated`);
- "echo": the query mostly copies the Challenger prompt: at least `echo_threshold` (0.5) of its
  words lie inside word n-grams (n = min(6, #words), lower-cased, punctuation ignored) that also
  occur in the prompt. Queries of fewer than 3 words are never called echoes. This catches the
  model repeating the rules, the examples or the unfilled template, but not a query that merely
  reuses a few of the prompt's words.
Invalid queries keep their cleaned text; the trainer decides what to do with them
(`algo.invalid_query`).

Quality judge (`QUALITY_JUDGE_PROMPT`, the self-reward R_Q): own wording of the paper's additive
0-7 rubric. `parse_quality_score` reads the last `<Score>N</Score>` (whitespace, a missing
closing tag and "N/7" tolerated); without one it falls back to the total after the last "=" in
the last `<Calculation>`, or the sum of its terms when they are all 0/1. Anything out of 0..7 or
not an integer -> None. A present but out-of-range `<Score>` is NOT rescued by the calculation:
the judge's stated verdict is invalid, so the row is a parse failure.

Reward judge (`REWARD_JUDGE_PROMPT`): a general 0-9 quality score, answered as "Score: N". A single
digit because '0'..'9' are single tokens in the SmolLM2, Llama-3 and our byte-level tokenizers,
so `lsp.selfplay.rewards.LLMJudgeReward` can read the whole score distribution from one next-token step.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lsp.selfplay.records import QueryCheck

START_MARKER = "<<TEMPLATE START>>"
END_MARKER = "<<TEMPLATE END>>"

CHALLENGER_PROMPT = """\
## Background
A language task pairs an input with the output it calls for. Two examples:
- Question answering: the input is a question, such as "Why is the sky blue?", and the output \
is its answer.
- Titling: the input is an essay, and the output is a fitting title for that essay.

## Request
Write ONE input for the task "{task}". Your input will be handed to another agent, who must \
produce the output. The input may be easy, intermediate, hard, or simply noisy. Aim for an input \
that puts the agent's abilities to the test.

## Details
Use the template between the start and end markers below. Copy it without the markers and \
replace every placeholder in curly braces with content of your own.
<<TEMPLATE START>>
{template}
<<TEMPLATE END>>

## Rules
- Do not give the answer, hints, or any information that gives the output away.
- Ask only for what a language agent can do with text.
- Stop as soon as the template is filled in.
- Do not write the start or end markers.
- If the task or the template is empty, use your best judgement."""

DEFAULT_TASK = "general instruction following"
DEFAULT_TEMPLATE = "{an instruction that a user would send to an AI assistant}"

QUALITY_JUDGE_PROMPT = """\
Review the user's instruction and the response below, and score them with the additive 7-point \
system described here. Start from 0 and add 1 point for each criterion that is met:
1. The user's task can be clearly identified from the instruction.
2. The instruction is clear, specific and well structured.
3. The user will clearly understand the response.
4. The response covers a significant part of the question, even if it is incomplete.
5. The response answers the core of the question in a useful and comprehensive way.
6. The response is clearly written, concise, well organised and helpful.
7. The user will most likely like the form and style of the response.

<Instruction>
{instruction}
</Instruction>

<Response>
{response}
</Response>

After examining the instruction and the response:
- Justify your total score briefly, in at most 100 words.
- Then write the sum of the seven points (1 or 0 each) inside <Calculation> tags, for example \
<Calculation>1+0+1+0+1+1+0=4</Calculation>.
- Finally write the total inside <Score> tags, for example <Score>4</Score>."""

REWARD_JUDGE_PROMPT = """\
Rate how good the response below is as a reply to the user's instruction, on a scale from 0 \
(useless, wrong or off-topic) to 9 (excellent: correct, complete, clear and helpful).

<Instruction>
{instruction}
</Instruction>

<Response>
{response}
</Response>

Reply with the score only, as a single digit, in the form "Score: N"."""

QUALITY_MAX_SCORE = 7
REWARD_MAX_SCORE = 9


def fill(text: str, /, **values: str) -> str:
    """Replace `{name}` for the given names in one pass; other braces are left untouched."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], text)


def render_challenger_prompt(task: str = DEFAULT_TASK, template: str = DEFAULT_TEMPLATE) -> str:
    return fill(CHALLENGER_PROMPT, task=task, template=template)


def render_quality_prompt(instruction: str, response: str) -> str:
    return fill(QUALITY_JUDGE_PROMPT, instruction=instruction, response=response)


def render_reward_judge_prompt(instruction: str, response: str) -> str:
    return fill(REWARD_JUDGE_PROMPT, instruction=instruction, response=response)


# ---------------------------------------------------------------- degenerate-query rule

_MARKER = re.compile(r"<<\s*TEMPLATE\s+(?:START|END)\s*>>", re.IGNORECASE)
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("```", "```"), ("`", "`")]


def clean_query(raw: str) -> str:
    text = _MARKER.sub("", raw).strip()
    for left, right in _QUOTES:  # one surrounding pair only: inner quotes are content
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    return text


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def echo_fraction(query: str, prompt: str, n: int = 6) -> float:
    """Fraction of the query's words covered by word n-grams that also occur in the prompt."""
    q, p = _words(query), _words(prompt)
    n = min(n, len(q))
    if n < 3:
        return 0.0
    prompt_grams = {tuple(p[i : i + n]) for i in range(len(p) - n + 1)}
    covered = [False] * len(q)
    for i in range(len(q) - n + 1):
        if tuple(q[i : i + n]) in prompt_grams:
            covered[i : i + n] = [True] * n
    return sum(covered) / len(q)


def _reason(query: str, prompt: str, max_chars: int, truncated: bool, echo_threshold: float) -> str:
    if not query:
        return "empty"
    if len(query) > max_chars:
        return "too_long"
    if truncated:
        return "truncated"
    if echo_fraction(query, prompt) >= echo_threshold:
        return "echo"
    return ""


def check_queries(
    raw: list[str],
    challenger_prompt: str,
    max_chars: int,
    truncated: list[bool] | Tensor | None = None,
    reject_truncated: bool = True,
    echo_threshold: float = 0.5,
) -> QueryCheck:
    """Clean the Challenger's N raw outputs and apply the degenerate-query rule (module doc)."""
    flags = [False] * len(raw) if truncated is None else [bool(t) for t in truncated]
    if len(flags) != len(raw):
        raise ValueError(f"{len(raw)} queries but {len(flags)} truncation flags")
    queries = [clean_query(r) for r in raw]
    reasons = [
        _reason(q, challenger_prompt, max_chars, t and reject_truncated, echo_threshold)
        for q, t in zip(queries, flags, strict=True)
    ]
    valid = torch.tensor([not r for r in reasons], dtype=torch.bool)  # (N,)
    return QueryCheck(queries=queries, valid=valid, reasons=reasons)


# ---------------------------------------------------------------- judge output parsing

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE = re.compile(r"<Score>\s*:?\s*" + _NUMBER + r"(?:\s*/\s*\d+)?", re.IGNORECASE)
_CALCULATION = re.compile(r"<Calculation>(.*?)(?:</Calculation>|$)", re.IGNORECASE | re.DOTALL)


def _as_score(number: str, max_score: int) -> int | None:
    value = float(number)
    if not value.is_integer() or not 0 <= value <= max_score:
        return None
    return int(value)


def _calculation_total(text: str, max_score: int) -> int | None:
    calcs = _CALCULATION.findall(text)
    if not calcs:
        return None
    calc = calcs[-1]
    if "=" in calc:
        total = re.match(r"\s*" + _NUMBER, calc.rsplit("=", 1)[1])
        return _as_score(total.group(1), max_score) if total else None
    terms = re.findall(r"-?\d+(?:\.\d+)?", calc)
    if not terms or any(t not in ("0", "1") for t in terms):
        return None
    return _as_score(str(sum(map(int, terms))), max_score)


def parse_quality_score(text: str, max_score: int = QUALITY_MAX_SCORE) -> int | None:
    """The judge's integer total in 0..max_score, or None (rules in the module doc)."""
    scores = _SCORE.findall(text)
    if scores:
        return _as_score(scores[-1], max_score)
    return _calculation_total(text, max_score)


def load_prompt_file(path: str) -> list[str]:
    """Instructions for the data-driven GRPO baseline: a JSON list (of strings, or of records
    with an `instruction` field), JSON Lines of either, or a text file with one per line."""
    import json
    from pathlib import Path

    from lsp.errors import InputFileError

    text = Path(path).read_text(encoding="utf-8")
    try:
        if path.endswith(".json"):
            items = json.loads(text)
        elif path.endswith(".jsonl"):
            items = [_json_line(line, n) for n, line in enumerate(text.splitlines(), 1)
                     if line.strip()]
        else:
            items = text.splitlines()
        prompts = [_instruction(i) for i in (items if isinstance(items, list) else [items])]
    except json.JSONDecodeError as err:
        raise InputFileError(f"prompt file {path}: malformed JSON at line {err.lineno}: "
                             f"{err.msg}") from None
    except InputFileError as err:  # a JSON Lines line
        raise InputFileError(f"prompt file {path}: {err}") from None
    except (KeyError, TypeError) as err:
        raise InputFileError(f"prompt file {path}: a record without an 'instruction' field "
                             f"({err})") from None
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise InputFileError(f"prompt file {path} holds no instructions")
    return prompts


def _json_line(line: str, n: int):
    import json

    from lsp.errors import InputFileError

    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputFileError(f"malformed JSON at line {n}: {err.msg}") from None


def _instruction(item) -> str:
    """A record's query; Alpaca-style records (alpaca_data.json) put the task's material in
    `input`, which belongs to the query."""
    if not isinstance(item, dict):
        return str(item)
    extra = str(item.get("input") or "").strip()
    return f"{item['instruction']}\n\n{extra}" if extra else str(item["instruction"])


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


OVERLAP_NGRAM = 8  # words: a shared 8-word run counts as contamination (GPT-3 used 13)


def word_ngrams(text: str, n: int = OVERLAP_NGRAM) -> set[tuple[str, ...]]:
    """The runs of n consecutive lower-cased words (letters, digits, apostrophes) of a text."""
    import re

    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def clean_instructions(prompts: list[str], held_out: list[str],
                       ngram: int = OVERLAP_NGRAM) -> tuple[list[str], dict]:
    """Training instructions minus duplicates and minus anything that overlaps a held-out
    (evaluation) text: the same text compared case- and whitespace-insensitively, or a shared run
    of `ngram` words, so a data arm never trains on AlpacaEval or IFEval prompts.
    Returns (kept, counts) with counts {read, duplicates, held_out_overlap, kept}."""
    held = {_normalised(t) for t in held_out}
    held_grams = set().union(*(word_ngrams(t, ngram) for t in held_out)) if held_out else set()
    seen: set[str] = set()
    kept, dup, overlap = [], 0, 0
    for p in prompts:
        key = _normalised(p)
        if key in seen:
            dup += 1
        elif key in held or word_ngrams(p, ngram) & held_grams:
            overlap += 1
        else:
            kept.append(p)
        seen.add(key)
    return kept, {"read": len(prompts), "duplicates": dup, "held_out_overlap": overlap,
                  "kept": len(kept), "overlap_ngram": ngram}
