"""Chat-template rendering: the one place that calls `apply_chat_template`.

Templates may read the clock: Llama-3's inserts "Today Date: <today>" into the system header
unless `date_string` is given, so the same prompt would render differently from one day to the
next (and the rollouts, reward inputs, judge prompts and evaluation outputs with it). Every call
here passes `date_string`: the date set by `set_chat_date`, which each entry point calls with
`model.chat_date` (conf/model/*.yaml). The default, 26 Jul 2024, is the date Llama-3.2's own
template falls back to when it has no clock. Templates that do not use a date (SmolLM2's ChatML)
ignore it.
"""

from __future__ import annotations

DEFAULT_CHAT_DATE = "26 Jul 2024"
_chat_date = DEFAULT_CHAT_DATE


def set_chat_date(date: str) -> None:
    """The date every chat template sees from now on (`model.chat_date`), for this process."""
    global _chat_date
    if not isinstance(date, str) or not date.strip():
        raise ValueError(f"chat date must be a non-empty string, got {date!r}")
    _chat_date = date


def chat_date() -> str:
    return _chat_date


def render_chat(tokenizer, user_message: str) -> str:
    """The prompt string for one user turn, ending with the assistant's generation prompt."""
    messages = [{"role": "user", "content": user_message}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         date_string=_chat_date)


def render_exchange(tokenizer, user_message: str, response: str) -> str:
    """One user turn and the assistant's response (a reward model's input)."""
    messages = [{"role": "user", "content": user_message},
                {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False, date_string=_chat_date)
