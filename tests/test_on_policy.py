"""Sampling and training agree: the log-probs the loss and the KL use are those of the distribution
the sampler drew from, and configurations under which they would not be are refused."""

from __future__ import annotations

import pytest
import torch

import lsp.engines.own as rollout
from lsp.chat import render_chat
from lsp.config import ConfigError, validate
from lsp.engines.own import generate
from lsp.engines.sampling import SamplingConfig, sampling_probs
from lsp.models import load_causal_lm, load_tokenizer, resolve_model
from lsp.selfplay.logprobs import completion_logprobs


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model("tiny:causal")
    return load_causal_lm(path), load_tokenizer(path)


def _sample_recording_probs(model, tok, cfg, monkeypatch):
    """Sample with the real decoding loop; return the rollout and, per step t, the sampler's own
    probability of each token it drew (rows still active at t, in order)."""
    seen = []
    real = rollout.next_token

    def recording(logits, cfg_, greedy=False):
        nxt = real(logits, cfg_, greedy)
        probs = sampling_probs(logits, cfg_)
        seen.append((probs / probs.sum(-1, keepdim=True)).gather(-1, nxt[:, None])[:, 0])
        return nxt

    monkeypatch.setattr(rollout, "next_token", recording)
    torch.manual_seed(0)
    prompts = [render_chat(tok, q) for q in ("Say hi.", "Name a colour.") for _ in range(3)]
    return generate(model, tok, prompts, cfg), seen


def _sampler_logprobs(roll, seen) -> torch.Tensor:
    # (B, C) log of the sampler's probabilities, placed back on the rows active at each step.
    out = torch.zeros(roll.completion_mask.shape)
    for t, p in enumerate(seen):
        rows = roll.completion_mask[:, t].bool().nonzero()[:, 0]
        out[rows, t] = p.log()
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_training_logprobs_are_the_samplers_own(tiny, monkeypatch, temperature):
    model, tok = tiny
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature)
    roll, seen = _sample_recording_probs(model, tok, cfg, monkeypatch)
    mask = roll.completion_mask.bool()
    assert len(seen) == mask.shape[1] and mask.sum() > 12  # several steps, several rows
    train = completion_logprobs(model, roll.sequences, roll.attention_mask, roll.prompt_len,
                                temperature)
    torch.testing.assert_close(train[mask], _sampler_logprobs(roll, seen)[mask], atol=1e-4,
                               rtol=0)
    if temperature != 1.0:  # the temperature matters: log-probs at T = 1 are another policy
        plain = completion_logprobs(model, roll.sequences, roll.attention_mask, roll.prompt_len)
        assert (plain[mask] - train[mask]).abs().max() > 1e-2


def test_top_p_sampling_is_another_distribution(tiny, monkeypatch):
    # Why top-p / top-k are refused for the trained roles: the sampler's probabilities are
    # renormalised over the nucleus, which the (tempered) training log-probs are not.
    model, tok = tiny
    cfg = SamplingConfig(max_new_tokens=8, top_p=0.5)
    roll, seen = _sample_recording_probs(model, tok, cfg, monkeypatch)
    mask = roll.completion_mask.bool()
    train = completion_logprobs(model, roll.sequences, roll.attention_mask, roll.prompt_len)
    assert (train[mask] - _sampler_logprobs(roll, seen)[mask]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.solver.top_p=1.5", "rollout.solver.top_p=1.5: must be in (0, 1]"),
        ("rollout.challenger.top_p=0", "rollout.challenger.top_p=0: must be in (0, 1]"),
        ("rollout.solver.temperature=0", "rollout.solver.temperature=0: must be > 0"),
        ("rollout.challenger.temperature=-1", "rollout.challenger.temperature=-1: must be > 0"),
        ("rollout.solver.top_p=0.9", "rollout.solver.top_p=0.9: the trained roles must sample"),
        ("rollout.challenger.top_k=50", "rollout.challenger.top_k=50: the trained roles must"),
        ("rollout.solver.top_k=-1", "rollout.solver.top_k=-1: must be >= 0"),
        ("rollout.group_size=abc", "rollout.group_size='abc'"),
    ],
)
def test_off_policy_or_invalid_sampling_is_refused_naming_the_key(compose_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=smoke", override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_sampling_temperature_is_accepted(compose_cfg):
    validate(compose_cfg("experiment=smoke", "rollout.solver.temperature=0.7",
                         "rollout.challenger.temperature=1.2"))


def test_hf_engine_ignores_the_models_own_sampling_settings(tiny, monkeypatch):
    # A model may ship a generation_config (repetition penalty, nucleus, n-gram ban) that
    # `generate` would apply on top of ours. The sampler's own log-probs (the processed scores
    # generate returns) must still be the tempered training log-probs.
    model, tok = tiny
    saved = model.generation_config
    model.generation_config = saved.__class__(**saved.to_dict())
    model.generation_config.update(repetition_penalty=3.0, top_p=0.3, no_repeat_ngram_size=2,
                                   min_p=0.2)
    scores = []
    real = model.generate

    def observed(**kwargs):
        out = real(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.extend(out.scores)  # per step (B, V), after every logits processor
        return out.sequences

    monkeypatch.setattr(model, "generate", observed)
    try:
        torch.manual_seed(0)
        prompts = [render_chat(tok, q) for q in ("Say hi.", "Name a colour.") for _ in range(2)]
        cfg = SamplingConfig(max_new_tokens=10, temperature=0.8, engine="hf")
        roll = generate(model, tok, prompts, cfg)
    finally:
        model.generation_config = saved
    ids = roll.sequences[:, roll.prompt_len:]
    sampler = torch.stack([s.log_softmax(-1).gather(-1, ids[:, t : t + 1])[:, 0]
                           for t, s in enumerate(scores[: ids.shape[1]])], dim=1)  # (B, C)
    mask = roll.completion_mask.bool()
    train = completion_logprobs(model, roll.sequences, roll.attention_mask, roll.prompt_len, 0.8)
    torch.testing.assert_close(train[mask], sampler[mask], atol=1e-4, rtol=0)
