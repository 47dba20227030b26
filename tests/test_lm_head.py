"""The fused LM head (lsp.selfplay.lm_head) against the plain head + log-softmax.

Stated tolerances:
- float64, the pure function: forward and both gradients equal log_softmax(h @ W^T / T) and its
  autograd gradients to float64 round-off (assert_close's float64 defaults).
- bf16 autocast, the pure function: the same bf16 logits as autocast's own linear, so the log-probs
  equal the plain path's within 1e-5; the gradients differ only in the order of float32 sums of
  bf16 products: within 1% of their norm.
- float32, whole models (completion_logprobs): fused vs plain within 1e-5 (log-probs, loss) and a
  gradient difference below 1e-4 of its norm, with and without prompt sharing, tied and untied
  heads, left padding and early EOS.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lsp.selfplay import lm_head
from lsp.selfplay.lm_head import head_parts, linear_token_logprobs
from lsp.selfplay.logprobs import completion_logprobs, token_logprobs


@pytest.fixture
def small_slices(monkeypatch):
    # 40 rows x 11 columns per slice: a vocabulary of 50 is split into 5 slices, the last short
    monkeypatch.setattr(lm_head, "_SLICE_ELEMENTS", 440)
    monkeypatch.setattr(lm_head, "_MIN_SLICE", 1)


def test_slices_cover_the_vocabulary_once(small_slices):
    s = lm_head._slices(50, 40)
    assert [(x.start, x.stop) for x in s] == [(0, 11), (11, 22), (22, 33), (33, 44), (44, 50)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_log_softmax_and_its_gradients_float64(small_slices, temperature):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=gen)
    targets[:5] = torch.tensor([0, 10, 11, 44, 49])  # slice edges
    upstream = torch.randn(40, generator=gen, dtype=torch.float64)

    out = linear_token_logprobs(h, w, targets, temperature)
    expected = ((h @ w.T) / temperature).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad((out * upstream).sum(), (h, w))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (h, w))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_bf16_autocast_equals_the_plain_head(small_slices):
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(40, 16, generator=gen)
    w0 = torch.randn(50, 16, generator=gen) * 0.3
    targets = torch.randint(0, 50, (40,), generator=gen)
    upstream = torch.randn(40, generator=gen)

    def run(fused):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = linear_token_logprobs(h, w, targets, 0.8)
            else:
                logits = torch.nn.functional.linear(h, w)  # (40, 50) bf16
                out = token_logprobs(logits[None], targets[None], 0.8)[0]
        (out * upstream).sum().backward()
        return out.detach(), h.grad, w.grad

    fused, plain = run(True), run(False)
    assert fused[1].dtype == plain[1].dtype == torch.float32
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=0)
    for g, e in zip(fused[1:], plain[1:], strict=True):
        assert (g - e).norm() <= 0.01 * e.norm()


def _llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config)


def _batch():
    # 2 prompts x 2 answers, left-padded prompts, right-padded answers (one ends early)
    prompts = [[5, 6, 7], [5, 6, 7], [9, 8], [9, 8]]
    answers = [[11, 12, 13, 14], [15, 16], [17, 18, 19], [250, 299, 3, 4]]
    seqs, masks = [], []
    for p, a in zip(prompts, answers, strict=True):
        seqs.append([0] * (3 - len(p)) + p + a + [0] * (4 - len(a)))
        masks.append([0] * (3 - len(p)) + [1] * (len(p) + len(a)) + [0] * (4 - len(a)))
    return torch.tensor(seqs), torch.tensor(masks), 3


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared", "full"])
def test_completion_logprobs_fused_equals_plain_float32(small_slices, tied, share_prefix):
    model = _llama(tied)
    seqs, mask, p = _batch()
    real = mask[:, p:].bool()
    weights = torch.linspace(-1, 1, real.numel()).view(real.shape)

    def run(fused):
        model.zero_grad(set_to_none=True)
        logp = completion_logprobs(model, seqs, mask, p, 0.8, share_prefix=share_prefix,
                                   fused_head=fused)
        loss = torch.where(real, logp * weights, 0.0).sum()
        loss.backward()
        grad = torch.cat([q.grad.flatten() for q in model.parameters()])
        return torch.where(real, logp.detach(), 0.0), loss.detach(), grad

    (lp1, l1, g1), (lp0, l0, g0) = run(True), run(False)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    assert (g1 - g0).norm() < 1e-4 * g0.norm()
    assert bool((lp1[real] < 0).all())  # real log-probs, not the zeros of the padding


def test_head_parts_only_for_plain_linear_heads():
    assert head_parts(_llama(True)) is not None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    assert head_parts(gpt2) is None  # not an allow-listed model type: the plain path


@pytest.mark.parametrize("spec", ["tiny:causal", "embedded:smollm2-135m-instruct"])
def test_shipped_models_take_the_fused_path(spec):
    # The allow-list is by model type: were a shipped model's type missing, every pass would
    # silently take the plain path (correct, only slower) and no other test would notice.
    from lsp.models import load_causal_lm, resolve_model

    parts = head_parts(load_causal_lm(resolve_model(spec)))
    assert parts is not None
    decoder, weight = parts
    assert weight.shape[0] == decoder.get_input_embeddings().weight.shape[0]  # (V, H)
