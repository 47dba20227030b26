import pytest
import torch
import transformers

from lsp.selfplay.logprobs import completion_logprobs, masked_mean, masked_sum, token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_gather(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=gen).to(torch.bfloat16)  # 5 rows > chunk_size
    targets = torch.randint(0, 11, (5, 7), generator=gen)
    expected = (logits.float() / temperature).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    out = token_logprobs(logits, targets, temperature, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradient_matches_log_softmax(temperature):
    """The fused backward (not autograd through log_softmax): chunked rows, a temperature and a
    non-uniform upstream gradient, as the loss sends it."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (5, 4), generator=gen)
    upstream = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    out = token_logprobs(logits, targets, temperature, chunk_size=2)
    (g,) = torch.autograd.grad((out * upstream).sum(), logits)
    expected = (logits / temperature).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    (g_expected,) = torch.autograd.grad((expected * upstream).sum(), logits)
    torch.testing.assert_close(g, g_expected)


def test_masked_sum_and_mean_hand_computed():
    x = torch.tensor([[1.0, 2.0, float("-inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # all: 1 + 2 + 4 + 6 = 13 over 4 entries; rows: [3, 10] over [2, 2]; cols: [5, 2, 6]
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(13.0))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(3.25))
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([2.5, 2.0, 6.0]))
    # an empty mask gives 0, not NaN
    torch.testing.assert_close(masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0))


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config)


def _tiny_gpt2():
    # Absolute position embeddings: unlike RoPE (invariant to shifting every position), a
    # wrong position_ids under left padding changes its output, so this model is what makes
    # the padding test sensitive to the position handling.
    config = transformers.GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module", params=[_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def tiny_model(request):
    torch.manual_seed(0)
    return request.param().eval()


def _pad_batch(prompts, completions, pad_id=0):
    # Left-pad prompts to P, right-pad completions to C: the rollout layout.
    p, c = max(map(len, prompts)), max(map(len, completions))
    seqs, masks = [], []
    for prompt, comp in zip(prompts, completions, strict=True):
        left, right = p - len(prompt), c - len(comp)
        seqs.append([pad_id] * left + prompt + comp + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(comp)) + [0] * right)
    return torch.tensor(seqs), torch.tensor(masks), p


def _unpadded_logprobs(model, prompt, comp, temperature):
    # One sequence, no padding: log p(comp_k | prompt, comp_<k) from the plain forward pass.
    ids = torch.tensor([prompt + comp])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_completion_logprobs_left_padded_batch_matches_unpadded(tiny_model, temperature):
    gen = torch.Generator().manual_seed(2)

    def rand_ids(n):
        return torch.randint(1, 64, (n,), generator=gen).tolist()

    prompts = [rand_ids(n) for n in (5, 2, 8)]
    completions = [rand_ids(n) for n in (4, 6, 1)]
    seqs, mask, p = _pad_batch(prompts, completions)
    with torch.no_grad():
        out = completion_logprobs(tiny_model, seqs, mask, p, temperature)
        assert out.shape == (3, 6)
        for b, (prompt, comp) in enumerate(zip(prompts, completions, strict=True)):
            expected = _unpadded_logprobs(tiny_model, prompt, comp, temperature)
            torch.testing.assert_close(out[b, : len(comp)], expected, atol=1e-5, rtol=1e-5)


def test_completion_logprobs_without_logits_to_keep(tiny_model):
    # A model whose forward has no logits_to_keep gets full logits, sliced afterwards.
    class NoKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
            )

    seqs, mask, p = _pad_batch([[3, 4, 5], [6]], [[7, 8], [9, 10, 11]])
    real = mask[:, p:].bool()  # log-probs at completion pads are meaningless (masked by callers)
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logprobs(NoKeep(tiny_model), seqs, mask, p)[real],
            completion_logprobs(tiny_model, seqs, mask, p)[real],
        )
