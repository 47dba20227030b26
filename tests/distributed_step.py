"""One self-play step on injected rollouts, on 1 process or under torchrun (2 processes, gloo).

Run by tests/test_distributed.py: `python -m torch.distributed.run --standalone
--nproc-per-node W tests/distributed_step.py SCENARIO OUT [ddp|fsdp] [MICRO_BATCH]` (W > 1: that
strategy; MICRO_BATCH > 1 puts rows that share a prompt in one micro-batch: share_prefix). Every rank plays its share of the
scenario's global queries in rank order (rank r: queries [r N/W, (r+1) N/W)), each answered by
fixed texts and scored by a deterministic program reward, so the 1-process and W-process runs
see the same global batch. Rank 0 saves the parameter update and the step's metrics to OUT.
Plain SGD (lr 1, no clipping): the update is the gradient itself, so a wrong normaliser or a
missing rank's rows shows up in full (Adam's first step would hide it under sign(grad)).
"""

from __future__ import annotations

import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lsp.chat import render_chat
from lsp.engines.sampling import SamplingConfig
from lsp.models import ensure_tiny, load_causal_lm, load_tokenizer
from lsp.selfplay.data import SelfPlayData
from lsp.selfplay.distributed import SelfPlayDDP, rank, world_size
from lsp.selfplay.fsdp import SelfPlayFSDP, full_state_dict, is_sharded
from lsp.selfplay.module import SelfPlayModule, SelfPlaySettings
from lsp.selfplay.records import RewardOutput, Rollout

# N = 4 global queries; "" and "   " are degenerate (lsp.selfplay.prompts.check_queries).
SCENARIOS = {
    "one_rank_invalid": ["Write a poem about rain.", "Name three colours.", "", "   "],
    "mixed": ["", "Name three colours.", "Write a poem about rain.", "Count to five."],
}
G = 2  # answers per query


def answers(query: str) -> list[str]:
    return [f"{query} Answer {j}: " + "la " * (3 + 2 * j + len(query) % 3) for j in range(G)]


def rollout(tok, prompts: list[str], completions: list[str]) -> Rollout:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    width = max(len(x) for x in ids)
    completion = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        completion[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return Rollout(torch.cat([enc["input_ids"], completion], 1),
                   torch.cat([enc["attention_mask"], mask], 1), enc["input_ids"].shape[1], mask,
                   list(prompts), list(completions), torch.zeros(len(ids), dtype=torch.bool))


class Replay:
    """An Engine that returns the scenario's fixed texts: the rank's queries to the Challenger's
    prompt, each query's G answers to the Solver's."""

    def __init__(self, tok, queries: list[str]):
        self.tok, self.queries = tok, queries
        self.by_prompt = {render_chat(tok, q): answers(q) for q in queries if q.strip()}

    def generate(self, prompts, cfg, greedy=False) -> Rollout:
        if prompts[0] not in self.by_prompt:  # the Challenger's prompt, N/W times
            return rollout(self.tok, prompts, self.queries)
        served: dict[str, int] = {}
        texts = []
        for p in prompts:
            texts.append(self.by_prompt[p][served.get(p, 0)])
            served[p] = served.get(p, 0) + 1
        return rollout(self.tok, prompts, texts)

    pushes_weights = False

    def push(self, model, state_dict=None) -> None: ...


class CharReward:
    """A program reward: characters / 10, or vowels / 5 (as a self-reward)."""

    def __init__(self, vowels: bool = False):
        self.vowels = vowels

    def score(self, instructions, responses) -> RewardOutput:
        values = [sum(c in "aeiou" for c in r) / 5 if self.vowels else len(r) / 10
                  for r in responses]
        return RewardOutput(torch.tensor(values), torch.zeros(len(values), dtype=torch.bool))


def main(scenario: str, out: str, strategy: str = "ddp", micro_batch: str = "1") -> None:
    torch.manual_seed(0)
    path = str(ensure_tiny("causal", Path(tempfile.gettempdir()) / "lsp-dist-test-models"))
    tok = load_tokenizer(path)
    policy = load_causal_lm(path, trainable=True)
    reference = load_causal_lm(path)
    devices = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    several = {"ddp": SelfPlayDDP, "fsdp": SelfPlayFSDP}[strategy]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices,
                        strategy=several() if devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    n = len(SCENARIOS[scenario]) // devices
    mine = SCENARIOS[scenario][trainer.global_rank * n:(trainer.global_rank + 1) * n]
    settings = SelfPlaySettings(num_queries=n, group_size=G, challenger_prompt="Ask me something.",
                                challenger=SamplingConfig(max_new_tokens=32),
                                solver=SamplingConfig(max_new_tokens=32), micro_batch_size=int(micro_batch),
                                grad_clip=None, reject_truncated=False)
    engine = Replay(tok, mine)
    module = SelfPlayModule(policy, reference, tok, CharReward(), CharReward(vowels=True),
                            settings, partial(torch.optim.SGD, lr=1.0),
                            engines={"challenger": engine, "solver": engine})
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    trainer.fit(module, datamodule=SelfPlayData())
    assert world_size() == devices, (world_size(), devices)
    assert is_sharded(policy) == (strategy == "fsdp" and devices > 1)
    after = full_state_dict(policy) if is_sharded(policy) else policy.state_dict()  # every rank
    if rank() == 0:
        delta = {k: after[k] - before[k] for k in before}
        torch.save(delta, out)
        Path(out).with_suffix(".json").write_text(json.dumps(module.last_metrics))


if __name__ == "__main__":
    main(*sys.argv[1:])
