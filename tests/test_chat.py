"""Chat rendering is deterministic: the date a template sees is the configured one, not today's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import transformers.utils.chat_template_utils as chat_utils

from lsp import chat
from lsp.chat import DEFAULT_CHAT_DATE, render_chat, render_exchange, set_chat_date
from lsp.config import ConfigError, validate
from lsp.models import byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]

# The date logic of Llama-3.1/3.2's template (as shipped with Llama-3.2-3B-Instruct), trimmed.
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture
def llama3_tokenizer():
    tok = byte_level_tokenizer()
    tok.chat_template = LLAMA3_STYLE
    return tok


@pytest.fixture
def today(monkeypatch):
    """today(date) sets the clock the templates' strftime_now reads."""

    def _set(day: dt.datetime) -> None:
        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return day

        monkeypatch.setattr(chat_utils, "datetime", Clock)

    return _set


@pytest.fixture(autouse=True)
def default_date():
    yield
    set_chat_date(DEFAULT_CHAT_DATE)


def _raw(tok) -> str:  # what a call without date_string renders
    messages = [{"role": "user", "content": "Hi"}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_rendering_does_not_depend_on_todays_date(llama3_tokenizer, today):
    today(dt.datetime(2025, 3, 14))
    first, first_raw = render_chat(llama3_tokenizer, "Hi"), _raw(llama3_tokenizer)
    first_pair = render_exchange(llama3_tokenizer, "Hi", "Hello!")
    today(dt.datetime(2026, 12, 1))
    assert render_chat(llama3_tokenizer, "Hi") == first
    assert render_exchange(llama3_tokenizer, "Hi", "Hello!") == first_pair
    assert "Today Date: 26 Jul 2024" in first and first.endswith("assistant<|end_header_id|>\n\n")
    # The control: without date_string the template prints the clock's date.
    assert "Today Date: 14 Mar 2025" in first_raw
    assert _raw(llama3_tokenizer) != first_raw and "Today Date: 01 Dec 2026" in _raw(llama3_tokenizer)


def test_the_configured_date_is_the_one_rendered(llama3_tokenizer):
    set_chat_date("01 Jan 2025")
    assert "Today Date: 01 Jan 2025" in render_chat(llama3_tokenizer, "Hi")
    assert chat.chat_date() == "01 Jan 2025"
    with pytest.raises(ValueError, match="non-empty"):
        set_chat_date(" ")


def test_chatml_templates_ignore_the_date():
    tok = byte_level_tokenizer()
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert render_chat(tok, "Hi") == plain


def test_every_template_call_goes_through_lsp_chat():
    # One place renders chats, so no caller can forget the date.
    offenders = [str(p.relative_to(REPO)) for folder in ("src", "pipelines")
                 for p in (REPO / folder).rglob("*.py")
                 if "apply_chat_template" in p.read_text() and p.name != "chat.py"]
    assert not offenders


@pytest.mark.parametrize("config_name", ["train", "evaluate", "select", "pipeline"])
def test_every_entry_point_config_has_the_fixed_date(compose_cfg, config_name):
    overrides = ["run_dir=x"] if config_name == "select" else []
    cfg = compose_cfg(*overrides, config_name=config_name)
    assert cfg.model.chat_date == DEFAULT_CHAT_DATE


def test_an_empty_chat_date_is_a_config_error(compose_cfg):
    with pytest.raises(ConfigError, match="model.chat_date"):
        validate(compose_cfg("experiment=smoke", "model.chat_date=''"))


def test_training_renders_with_the_configured_date(compose_cfg, workdir, monkeypatch):
    # Every chat rendered during a training step (Challenger prompt, Solver prompts, judges)
    # is given the configured date.
    from transformers import PreTrainedTokenizerBase

    from lsp.train import train

    dates = []
    real = PreTrainedTokenizerBase.apply_chat_template

    def spy(self, *args, **kwargs):
        dates.append(kwargs.get("date_string"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", spy)
    train(compose_cfg("experiment=smoke", "trainer.max_steps=1", "model.chat_date='02 Feb 2025'"))
    assert len(dates) >= 3 and set(dates) == {"02 Feb 2025"}
