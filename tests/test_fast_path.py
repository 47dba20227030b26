"""The fast path computes the same loss and gradients as the plain float32 path (issue 5).

Fast path = what the CPU defaults run: one prompt pass per distinct prompt (`share_prefix`,
lsp.selfplay.logprobs), grouped-query attention (lsp.models, `attn_implementation="auto"` on CPU), the
fused log-prob backward, the `lsp` decoding engine (lsp.engines.own) and bf16 autocast.
Plain path = transformers' SDPA attention, every row run in full, float32, `model.generate`.

Stated tolerances, on the smoke model (`tiny:causal`):
- float32, fast vs plain: only the order of float32 operations differs: loss within 1e-5
  (absolute), per-token log-probs within 1e-5, gradient difference below 1e-4 of the gradient
  norm.
- bf16 autocast (8-bit mantissa in the matrix products) vs float32 plain: loss within 2%, gradient
  cosine similarity above 0.999 and its norm within 2%.
- decoding: greedy tokens identical to `model.generate` (incl. rows that stop early).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from lsp.chat import render_chat
from lsp.engines.own import _hf_generate, decode, generate
from lsp.engines.sampling import SamplingConfig, completion_mask, next_token
from lsp.models import autocast, byte_level_tokenizer, load_causal_lm, load_tokenizer, resolve_model
from lsp.selfplay import losses
from lsp.selfplay.logprobs import PromptMemo, completion_logprobs
from lsp.selfplay.losses import role_counts
from lsp.selfplay.module import SelfPlaySettings
from lsp.selfplay.passes import (
    RolePass,
    backward_role,
    micro_batches,
    reference_logprobs,
    role_batches,
)
from lsp.selfplay.records import Rollout
from lsp.selfplay.rewards import LengthReward


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model("tiny:causal")
    plain = load_causal_lm(path, trainable=True, attn_implementation="sdpa")
    fast = load_causal_lm(path, trainable=True)  # "auto": grouped attention on CPU
    return plain, fast, load_tokenizer(path)


def _rollouts(model, tok) -> list[Rollout]:
    # Challenger-like (one prompt, 4 samples) and Solver-like (3 prompts x 2 answers) batches.
    torch.manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=12)
    challenger = [render_chat(tok, "Write one instruction.")] * 4
    solver = [render_chat(tok, q) for q in ("Hi", "Name three colours.", "2+2?") for _ in range(2)]
    return [generate(model, tok, prompts, cfg) for prompts in (challenger, solver)]


def _loss_and_grad(model, r: Rollout, share_prefix: bool, amp, fused_head: bool = True):
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(r.sequences.shape[0], generator=gen)  # (B,)
    ref = -torch.rand(r.completion_mask.shape, generator=gen) * 3  # (B, C) frozen log-probs
    with autocast("cpu", amp):
        logp = completion_logprobs(model, r.sequences, r.attention_mask, r.prompt_len,
                                   share_prefix=share_prefix, fused_head=fused_head).float()
    loss, _ = losses.policy_loss(logp, ref, advantages, r.completion_mask, beta=0.05)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss.detach(), torch.where(r.completion_mask.bool(), logp.detach(), 0.0), grad


def test_auto_attention_is_grouped_on_cpu(tiny):
    _, fast, _ = tiny
    assert fast.config._attn_implementation == "lsp_grouped"


@pytest.mark.parametrize("attention", ["lsp_grouped", "sdpa"])  # CPU default / GPUs
def test_fast_path_float32_matches_plain_path(tiny, attention):
    # the shared prompt pass, its repeated KV cache and left-padded rows, under the CPU's grouped
    # attention and under SDPA's masks (GPUs), give the full rows' numbers
    plain, fast, tok = tiny
    shared = fast if attention == "lsp_grouped" else plain
    assert shared.config._attn_implementation == attention
    for r in _rollouts(plain, tok):
        loss0, logp0, grad0 = _loss_and_grad(plain, r, share_prefix=False, amp=None)
        loss1, logp1, grad1 = _loss_and_grad(shared, r, share_prefix=True, amp=None)
        torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=0)
        torch.testing.assert_close(logp1, logp0, atol=1e-5, rtol=0)
        assert (grad1 - grad0).norm() < 1e-4 * grad0.norm()


def test_fast_path_bf16_autocast_close_to_float32(tiny):
    plain, fast, tok = tiny
    for r in _rollouts(plain, tok):
        loss0, _, grad0 = _loss_and_grad(plain, r, share_prefix=False, amp=None)
        loss1, _, grad1 = _loss_and_grad(fast, r, share_prefix=True, amp=torch.bfloat16)
        assert abs(loss1 - loss0) <= 0.02 * abs(loss0)
        assert torch.nn.functional.cosine_similarity(grad1, grad0, dim=0) > 0.999
        assert abs(grad1.norm() - grad0.norm()) <= 0.02 * grad0.norm()


@pytest.mark.parametrize("fused_head", [True, False])
def test_share_prefix_steps_aside_under_gradient_checkpointing(fused_head):
    # transformers drops the KV cache of checkpointed layers in training mode, so the shared
    # prompt pass has nothing to hand on: the rows run in full (the paper config's setting).
    path = resolve_model("tiny:causal")
    plain = load_causal_lm(path, trainable=True, attn_implementation="sdpa")
    checkpointed = load_causal_lm(path, trainable=True)
    checkpointed.gradient_checkpointing_enable()
    plain.train()
    checkpointed.train()
    for r in _rollouts(plain, load_tokenizer(path)):
        _, logp0, grad0 = _loss_and_grad(plain, r, share_prefix=False, amp=None)
        _, logp1, grad1 = _loss_and_grad(checkpointed, r, share_prefix=True, amp=None,
                                         fused_head=fused_head)
        torch.testing.assert_close(logp1, logp0, atol=1e-5, rtol=0)
        assert (grad1 - grad0).norm() < 1e-4 * grad0.norm()


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    # The smoke model's greedy output repeats one token; larger initial weights give varied text.
    torch.manual_seed(0)
    tok = byte_level_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("varied")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    plain = load_causal_lm(str(path), attn_implementation="sdpa")
    return plain, load_causal_lm(str(path)), load_tokenizer(str(path))


@pytest.mark.parametrize("fused_head", [True, False])
def test_reference_prompt_memo_gives_the_same_logprobs(tiny, fused_head):
    """`model.reference_prompt_memo`: pi_ref's pass over the Challenger's prompt is kept between
    steps and reused: bit-identical log-probs, the kept KV cache unaltered by the passes that
    reuse it, and nothing served from it for another prompt, another autocast, or with grad."""
    _, model, tok = tiny  # its weights stay as they are: a frozen reference here
    challenger, solver = _rollouts(model, tok)
    torch.manual_seed(5)  # the next step: the same prompt, other samples
    prompt = [render_chat(tok, "Write one instruction.")] * 4
    later = generate(model, tok, prompt, SamplingConfig(max_new_tokens=12))
    assert torch.equal(later.sequences[:, : later.prompt_len],
                       challenger.sequences[:, : challenger.prompt_len])
    assert not torch.equal(later.sequences, challenger.sequences)

    def logprobs(r: Rollout, memo=None, amp=None):
        with torch.no_grad(), autocast("cpu", amp):
            return completion_logprobs(model, r.sequences, r.attention_mask, r.prompt_len, 0.7,
                                       fused_head=fused_head, prompt_memo=memo)

    memo = PromptMemo()
    for step, r in enumerate([challenger, later, challenger, later]):
        assert torch.equal(logprobs(r, memo), logprobs(r))
        assert memo.hits == step  # the first step runs the prompt; every later one reuses it
    assert torch.equal(logprobs(solver, memo), logprobs(solver))  # other prompts: run
    assert memo.hits == 3
    bf16 = logprobs(challenger, memo, torch.bfloat16)  # another autocast: run again
    assert memo.hits == 3 and torch.equal(bf16, logprobs(challenger, amp=torch.bfloat16))
    with pytest.raises(RuntimeError, match="no_grad"):  # never for a model being trained
        completion_logprobs(model, challenger.sequences, challenger.attention_mask,
                            challenger.prompt_len, prompt_memo=memo)


@pytest.mark.parametrize("attention", ["lsp_grouped", "sdpa"])  # CPU default / GPUs
def test_lsp_decoding_matches_generate_greedy_with_early_stops(varied, attention):
    plain, fast, tok = varied
    decoder = fast if attention == "lsp_grouped" else plain
    assert decoder.config._attn_implementation == attention
    prompts = [render_chat(tok, q) for q in ("Hi", "Hello there", "Hi") for _ in range(2)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = SamplingConfig(max_new_tokens=16)
    hf = _hf_generate(plain, enc, cfg, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    # Make rows stop at different steps: the token row 0 produces at step 5 becomes an EOS.
    eos = [tok.eos_token_id, int(hf[0, 5])]
    hf = _hf_generate(plain, enc, cfg, eos, tok.pad_token_id, greedy=True)
    ours = decode(decoder, enc["input_ids"], enc["attention_mask"], cfg, eos, tok.pad_token_id,
                  greedy=True)
    mask, ended = completion_mask(hf, eos)
    assert ended.any() and not ended.all()
    assert torch.equal(completion_mask(ours, eos)[0], mask[:, : ours.shape[1]])
    assert torch.equal(torch.where(mask[:, : ours.shape[1]].bool(), ours, -1),
                       torch.where(mask.bool(), hf, -1)[:, : ours.shape[1]])
    assert int(mask.sum(-1).max()) == ours.shape[1]  # stops when every row has ended


def test_next_token_samples_softmax_with_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, 5)

    def freq(cfg):
        return torch.bincount(next_token(logits, cfg), minlength=5).float() / logits.shape[0]

    probs = torch.softmax(logits[0] / 0.7, -1)
    torch.testing.assert_close(freq(SamplingConfig(temperature=0.7)), probs, atol=0.015, rtol=0)
    top2 = torch.softmax(logits[0, :2], -1)
    torch.testing.assert_close(freq(SamplingConfig(top_k=2)), torch.cat([top2, torch.zeros(3)]),
                               atol=0.015, rtol=0)
    # softmax([2, 1, 0.5, 0, -1]) = [.52, .19, .12, .07, .03]: mass .52 < .6, .71 >= .6 -> 2 kept
    torch.testing.assert_close(freq(SamplingConfig(top_p=0.6)), torch.cat([top2, torch.zeros(3)]),
                               atol=0.015, rtol=0)


def test_length_reward_is_per_char():
    out = LengthReward(per_char=0.5).score(["q", "q"], ["abcd", ""])
    torch.testing.assert_close(out.values, torch.tensor([2.0, 0.0]))
    assert not out.parse_failed.any()


def test_reserved_cache_layer_writes_in_place_then_grows_when_out_of_room():
    """The decoding loop's KV layer: the prompt, then one position written into its buffer (no
    copy of the cache), then, out of room, growth by concatenation like DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    from lsp.engines.own import _reserved_layer_class

    gen = torch.Generator().manual_seed(0)
    k0, v0, k1, v1, k2, v2 = (torch.randn(2, 2, n, 4, generator=gen) for n in (3, 3, 1, 1, 2, 2))
    layer = _reserved_layer_class()(1)  # room for one position past the prompt
    assert isinstance(layer, DynamicLayer)
    layer.update(k0, v0)
    buffer = layer.buffers[0].data_ptr()
    keys, values = layer.update(k1, v1)  # fits: in place
    assert keys.data_ptr() == buffer
    torch.testing.assert_close(keys, torch.cat([k0, k1], dim=-2))
    layer.batch_select_indices(torch.tensor([1]))  # a row leaves: the buffers follow
    assert layer.buffers[0].shape[0] == 1 and layer.keys.data_ptr() == layer.buffers[0].data_ptr()
    keys, values = layer.update(k2[1:], v2[1:])  # two more arrive: out of room
    torch.testing.assert_close(keys, torch.cat([k0, k1, k2], dim=-2)[1:])
    torch.testing.assert_close(values, torch.cat([v0, v1, v2], dim=-2)[1:])
    assert layer.buffers is None and layer.get_seq_length() == 6



def test_micro_batches_group_rows_by_length():
    lengths = torch.tensor([3, 9, 1, 9, 5])
    assert [mb.tolist() for mb in micro_batches(5, 2, lengths)] == [[1, 3], [4, 0], [2]]
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(2, 4, lengths[:2]) == [slice(0, 2)]  # one micro-batch: nothing to group


def _cut(r: Rollout, lengths: list[int]) -> Rollout:
    # the rollout with row i's completion ended after lengths[i] tokens (as an earlier EOS would)
    keep = torch.arange(r.completion_mask.shape[1]) < torch.tensor(lengths)[:, None]  # (B, C)
    mask = r.completion_mask * keep
    seq = r.sequences.clone()
    seq[:, r.prompt_len:] = torch.where(mask.bool(), seq[:, r.prompt_len:], 0)
    return dataclasses.replace(r, sequences=seq, completion_mask=mask,
                               attention_mask=torch.cat([r.attention_mask[:, :r.prompt_len], mask], 1))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_group_by_length_gives_the_same_logprobs_loss_and_gradients(tiny, checkpointing):
    # Solver-like rows (3 prompts x 2 answers) of uneven lengths, micro-batches of 2. Grouped by
    # length where prompts are not shared: under gradient checkpointing (the paper config), or
    # with share_prefix off.
    plain, _, tok = tiny
    path = resolve_model("tiny:causal")
    policy = load_causal_lm(path, trainable=True)
    if checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    solver = _cut(_rollouts(plain, tok)[1], [2, 12, 3, 11, 12, 1])
    gen = torch.Generator().manual_seed(2)
    advantages = torch.randn(6, generator=gen)

    def run(group: bool):
        s = SelfPlaySettings(micro_batch_size=2, group_by_length=group,
                             share_prefix=checkpointing)  # checkpointing: shared but steps aside
        ref = reference_logprobs(plain, solver, 1.0, s, torch.device("cpu"))
        policy.zero_grad(set_to_none=True)
        role = RolePass(solver, advantages, 1.0, 1.0, role_counts(solver))
        stats = backward_role(policy, role, ref, s, torch.device("cpu"), lambda x: x.backward())
        grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
        return ref, stats.loss, grad, role_batches(policy, solver, s, s.share_prefix)

    ref0, loss0, grad0, batches0 = run(False)
    ref1, loss1, grad1, batches1 = run(True)
    assert all(isinstance(mb, slice) for mb in batches0)
    assert [mb.tolist() for mb in batches1] == [[1, 4], [3, 2], [0, 5]]
    torch.testing.assert_close(ref1, ref0, atol=1e-5, rtol=0)  # rows back in the rollout's order
    assert abs(loss1 - loss0) < 1e-5
    assert (grad1 - grad0).norm() < 1e-4 * grad0.norm()
    # the point of it: fewer token columns computed (each micro-batch runs its real columns)
    width = lambda mb: int(solver.completion_mask[mb].sum(-1).max())  # noqa: E731
    assert sum(2 * width(mb) for mb in batches1) < sum(2 * width(mb) for mb in batches0)


def test_shared_prompts_keep_their_rows_in_order(tiny):
    # where the pass shares prompts, a prompt's rows must stay together: no grouping
    plain, _, tok = tiny
    s = SelfPlaySettings(micro_batch_size=2, group_by_length=True, share_prefix=True)
    solver = _cut(_rollouts(plain, tok)[1], [2, 12, 3, 11, 12, 1])
    assert plain.training  # a trainable model, not checkpointed: it shares prompts
    assert all(isinstance(mb, slice) for mb in role_batches(plain, solver, s, True))
    assert not all(isinstance(mb, slice) for mb in role_batches(plain, solver, s, False))
