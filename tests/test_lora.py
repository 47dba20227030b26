"""LoRA on the policy (`model.lora`, lsp.lora) on tiny random models: pi_ref is the policy with its
adapters disabled and equals the base model exactly; the merged export and the pushed weights are
the adapted policy; checkpoints load in either form; the exact KL gradient holds with LoRA; a
training run with LoRA on resumes."""

from __future__ import annotations

import copy

import pytest
import torch
from test_kl_gradient import _batch, _float64_norms, _naive_seq_logp, _tiny_llama, masked_seq
from transformers import AutoModelForCausalLM

from lsp import lora
from lsp.models import load_causal_lm, resolve_model
from lsp.selfplay.logprobs import completion_logprobs
from lsp.selfplay.losses import policy_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise_adapters(model, scale: float = 0.5, seed: int = 0) -> None:
    # fresh adapters have B = 0 (the policy is the base model): move them, as training would
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def tiny_pair():
    """(base, LoRA policy over an identical copy of it, with moved adapters)."""
    path = resolve_model("tiny:causal")
    base = load_causal_lm(path)
    policy = lora.add_adapters(load_causal_lm(path), 4, 8.0, 0.0, TARGETS)
    _randomise_adapters(policy)
    return base, policy.eval()


def _rows(vocab: int):
    torch.manual_seed(3)
    seqs = torch.randint(3, vocab, (4, 12))
    mask = torch.ones_like(seqs)
    mask[0, :2] = 0  # a left-padded prompt
    return seqs, mask


def test_adapters_disabled_is_the_base_model_exactly(tiny_pair):
    base, policy = tiny_pair
    seqs, mask = _rows(base.config.vocab_size)
    with torch.no_grad():
        want = completion_logprobs(base, seqs, mask, 5, 0.7)
        adapted = completion_logprobs(policy, seqs, mask, 5, 0.7)
        policy.train()  # the reference pass runs while the policy is in training mode
        with lora.adapters_disabled(policy):
            assert not policy.training
            ref = completion_logprobs(policy, seqs, mask, 5, 0.7)
        assert policy.training  # restored
    assert torch.equal(ref, want)  # bit for bit: the same weights, the same code path
    assert (adapted - want).abs().max() > 1e-3  # the adapters do change the policy
    # a model without adapters: the context changes nothing
    with lora.adapters_disabled(base):
        assert torch.equal(completion_logprobs(base, seqs, mask, 5, 0.7), want)


def test_only_the_adapters_train_and_the_reference_shares_the_weights(tiny_pair):
    base, policy = tiny_pair
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # what a separate pi_ref would hold: every base weight, once (tied embedding counted once)
    want = sum(p.numel() * 4 for p in base.parameters())
    assert lora.parameter_bytes(policy, torch.float32) == want
    assert lora.parameter_bytes(policy, torch.bfloat16) == want // 2


def test_the_merged_weights_are_the_adapted_policy_and_leave_it_untouched(tiny_pair, tmp_path):
    base, policy = tiny_pair
    before = {n: p.clone() for n, p in policy.named_parameters()}
    merged = lora.merged_state_dict(policy)
    assert set(merged) == set(base.state_dict())  # the base model's own names
    copy_ = copy.deepcopy(base)
    copy_.load_state_dict(merged)
    seqs, mask = _rows(base.config.vocab_size)
    with torch.no_grad():
        want = policy(input_ids=seqs, attention_mask=mask).logits
        torch.testing.assert_close(copy_(input_ids=seqs, attention_mask=mask).logits, want,
                                   rtol=0, atol=1e-4)
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"
    # the checkpoint form: merged at the top (from_pretrained), the adapter in adapter/
    lora.save(policy, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    # the adapter form: merged into its base once (lsp.models.resolve_model), then loaded alike
    folder = resolve_model(str(tmp_path / "ckpt" / "adapter"), tmp_path / "cache")
    assert folder != str(tmp_path / "ckpt" / "adapter")
    from_adapter = AutoModelForCausalLM.from_pretrained(folder)
    real = mask.bool()  # pad positions' outputs depend on the attention kernel: not compared
    with torch.no_grad():
        for model in (loaded, from_adapter):
            got = model(input_ids=seqs, attention_mask=mask).logits
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4)
    assert resolve_model(str(tmp_path / "ckpt" / "adapter"), tmp_path / "cache") == folder


def test_the_exact_kl_gradient_holds_with_lora():
    """tests/test_kl_gradient.py's check with a LoRA policy whose pi_ref is its own base model
    (adapters disabled): the default KL term's expected gradient over every sequence equals the
    exact gradient of KL(pi || pi_ref), with respect to the adapters (all that trains)."""
    policy = lora.add_adapters(_tiny_llama(0), 2, 4.0, 0.0, ["q_proj", "v_proj", "up_proj"])
    policy.double()
    _float64_norms(policy)
    _randomise_adapters(policy, scale=1.0)
    params = [p for p in policy.parameters() if p.requires_grad]

    def grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    logp = _naive_seq_logp(policy, 1.0)
    with torch.no_grad(), lora.adapters_disabled(policy):
        ref = _naive_seq_logp(policy, 1.0)
    kl = (logp.exp() * (logp - ref)).sum()
    exact = grad(kl)
    assert kl.item() > 0.05 and exact.norm() > 0.05  # not vacuous
    seqs, attn, mask = _batch()
    tok = completion_logprobs(policy, seqs, attn, 3)  # (S, C), the training path
    with torch.no_grad(), lora.adapters_disabled(policy):
        tok_ref = completion_logprobs(policy, seqs, attn, 3)
    weight = masked_seq(tok.detach(), mask).exp()
    total = 0.0
    for s in range(seqs.shape[0]):
        loss, _ = policy_loss(tok[s : s + 1], tok_ref[s : s + 1], torch.zeros(1, dtype=tok.dtype),
                              mask[s : s + 1], beta=1.0)
        total = total + weight[s] * loss
    assert (grad(total) - exact).abs().max() < 1e-10


def test_a_lora_run_trains_the_adapters_and_resumes(compose_cfg, workdir):
    from lsp.io import latest_checkpoint
    from lsp.train import train

    base = ["experiment=smoke", "model.lora.r=4", "trainer.max_steps=2", "optim.lr=0.01",
            "run_dir=lora_run", "callbacks.checkpoint.every_n_steps=1"]
    first = train(compose_cfg(*base))
    ckpt = latest_checkpoint(workdir / "lora_run" / "checkpoints")
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert (ckpt / "config.json").is_file()
    assert first["metrics"]["kl/solver"] != 0.0  # the adapters moved the policy off pi_ref
    resumed = train(compose_cfg(*base[:2], "trainer.max_steps=3", *base[3:], "resume=true"))
    assert resumed["global_step"] == 3
