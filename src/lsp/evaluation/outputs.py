"""Evaluation sets and the generation of AlpacaEval `model_outputs.json` records.

A record is `{"instruction", "output", "generator", "dataset"}`; alpaca-eval joins a model's records
to the baseline's on the exact `instruction` string, and `dataset` names the AlpacaEval subset.

Generation is resumable: every generator has a store (`<store_dir>/<generator>.jsonl`, rewritten
atomically after each batch, plus `<generator>.meta.json` with the settings that produced it). A
restart, or a later evaluation on more instructions, generates only the instructions the store lacks;
a store made with other settings is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from lsp.errors import InputError
from lsp.io import atomic_write_json, atomic_write_text, read_jsonl
from lsp.models import amp_dtype, resolve_device

RECORD_KEYS = ("instruction", "output", "generator", "dataset")
SUBSETS = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")


class EvalSetUnavailableError(InputError, RuntimeError):
    """The evaluation set can be had neither from the configured file nor from the hub."""


class StoreMismatchError(InputError, RuntimeError):
    """A generation store exists but was made with other settings."""


def load_eval_set(path: str | Path | None, hub_config: str = "alpaca_eval_gpt4_baseline") -> list[dict]:
    """The AlpacaEval instructions (with reference outputs): from a local JSON file in the AlpacaEval
    format, or (path None) from alpaca-eval's hub loader (`alpaca_eval_gpt4_baseline`: the 2.0
    references; `alpaca_eval`: the 1.0 references)."""
    records = _hub_eval_set(hub_config) if path is None else _read_json_records(path)
    if not isinstance(records, list) or not records:
        raise EvalSetUnavailableError(f"Evaluation set {path}: expected a non-empty JSON list of "
                                      "records (AlpacaEval format)")
    for i, r in enumerate(records):
        missing = [k for k in ("instruction", "dataset")
                   if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise EvalSetUnavailableError(f"Evaluation set {path}: record {i} lacks the string "
                                          f"fields {missing} (AlpacaEval format)")
    if len({r["instruction"] for r in records}) != len(records):
        raise EvalSetUnavailableError(
            f"Evaluation set {path} repeats instructions; alpaca-eval joins outputs on them."
        )
    return records


def _read_json_records(path: str | Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalSetUnavailableError(
            f"Evaluation set file '{path}' (relative to {Path.cwd()}) does not exist. Point "
            "eval.eval_set.path at an AlpacaEval-format JSON (e.g. "
            "../shared/alpaca_eval/gpt4_1106_preview_outputs.json), or set it to null to use "
            "alpaca-eval's hub loader."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalSetUnavailableError(f"Evaluation set {path}: not valid JSON ({err})") from None


def _hub_eval_set(hub_config: str) -> list[dict]:
    try:
        from alpaca_eval import constants

        dataset = constants.get_alpaca_eval_data(hub_config)
        return [dict(row) for row in dataset]
    except Exception as err:  # offline, datasets>=4, gated: all end here
        raise EvalSetUnavailableError(
            "alpaca-eval's hub loader could not provide the AlpacaEval set "
            f"({type(err).__name__}: {err}). Offline, set eval.eval_set.path to a local copy "
            "(e.g. ../shared/alpaca_eval/gpt4_1106_preview_outputs.json)."
        ) from err


def stratified_subset(records: Sequence[dict], k_per_subset: int | None, seed: int) -> list[dict]:
    """k records of every `dataset` subset (all of a smaller one), in the eval set's order.

    Each subset draws from its own generator seeded by (seed, subset name), so a subset's draw does
    not depend on which other subsets the file holds."""
    if k_per_subset is None:
        return list(records)
    by_subset: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_subset.setdefault(r["dataset"], []).append(i)
    chosen: set[int] = set()
    for name, idx in by_subset.items():
        chosen.update(random.Random(f"{seed}:{name}").sample(idx, min(k_per_subset, len(idx))))
    return [r for i, r in enumerate(records) if i in chosen]


def as_model_outputs(records: Sequence[dict], generator: str) -> list[dict]:
    return [
        {"instruction": r["instruction"], "output": r["output"], "generator": generator,
         "dataset": r["dataset"]}
        for r in records
    ]


@dataclass
class GenerationSettings:
    """Checked at the config boundary (lsp.config.schema.GenerationSection)."""

    temperature: float = 0.01  # the paper's evaluation temperature
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 8  # not part of the store's identity: a resume may change it
    dtype: str = "float32"
    amp: str = "none"
    seed: int = 0
    engine: str = "lsp"  # lsp | hf | vllm (lsp.engines); like batch_size, not in the store's identity


class OutputStore:
    """Every record one generator has produced, persisted after each batch."""

    def __init__(self, folder: str | Path, generator: str, meta: dict):
        self.path = Path(folder) / f"{generator}.jsonl"
        self.meta_path = Path(folder) / f"{generator}.meta.json"
        self.meta = meta
        self.records: dict[str, dict] = {}
        if self.meta_path.exists():
            stored = json.loads(self.meta_path.read_text())
            if stored != meta:
                raise StoreMismatchError(
                    f"{self.path} was generated with {stored}, not {meta}. Use another generator "
                    "name or out_dir, or delete the store to regenerate."
                )
        if self.path.exists():  # written atomically per batch: never torn
            self.records = {rec["instruction"]: rec for rec in read_jsonl(self.path)}

    def add(self, batch: Sequence[dict]) -> None:
        if not self.meta_path.exists():
            atomic_write_json(self.meta_path, self.meta)
        for rec in batch:
            self.records[rec["instruction"]] = rec
        lines = (json.dumps(r, ensure_ascii=False) for r in self.records.values())
        atomic_write_text(self.path, "\n".join(lines) + "\n")


class Answer(str):
    """A generated answer (a str), flagged `truncated` when it hit max_new_tokens before EOS."""

    truncated: bool | None = None

    @classmethod
    def of(cls, text: str, truncated: bool) -> Answer:
        answer = cls(text)
        answer.truncated = truncated
        return answer


# (engine, tokenizer, instructions, settings) -> completions; tests and callers may swap it.
Generator = Callable[[object, object, list[str], GenerationSettings], list[str]]


def sample_answers(engine, tokenizer, instructions: list[str], settings: GenerationSettings
                   ) -> list[Answer]:
    """One chat answer per instruction (the instruction is the user message, as in the paper),
    sampled by `engine` (lsp.engines)."""
    import torch

    from lsp.chat import render_chat
    from lsp.engines.sampling import SamplingConfig

    torch.manual_seed(settings.seed)
    cfg = SamplingConfig(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, top_k=0, batch_size=settings.batch_size, engine=settings.engine,
    )
    prompts = [render_chat(tokenizer, q) for q in instructions]
    rollout = engine.generate(prompts, cfg)
    return [Answer.of(c.strip(), bool(t))
            for c, t in zip(rollout.completions, rollout.truncated.tolist(), strict=True)]


def load_engine(spec: str, settings: GenerationSettings, device: str,
                cache_dir: str | None = None):
    """(engine, tokenizer) of the model `spec` for `settings.engine`."""
    from lsp.engines import EnginePool
    from lsp.models import load_causal_lm, load_tokenizer, resolve_model

    path, device = resolve_model(spec, cache_dir), resolve_device(device)
    model, tok = load_causal_lm(path, settings.dtype, device), load_tokenizer(path)
    amp = amp_dtype(settings.amp, device)
    return EnginePool(device).get(settings.engine, model, tok, path, settings.dtype, amp), tok


def generate_outputs(
    model_spec: str, records: Sequence[dict], generator: str, settings: GenerationSettings,
    store_dir: str | Path, device: str = "auto", cache_dir: str | None = None,
    answer: Generator = sample_answers,
) -> list[dict]:
    """`model_outputs.json` records of `model_spec` for `records`, generating only what the store
    lacks (in batches, longest instructions first to waste little padding). Each record also
    says whether the answer was `truncated` (None in stores from before that was kept)."""
    from lsp.chat import chat_date

    # The chat date is part of the prompt (Llama-3 prints it): answers rendered under another
    # date are not reused.
    meta = {"model": model_spec, **asdict(settings), "chat_date": chat_date()}
    meta.pop("batch_size")
    meta.pop("engine")  # the same distribution from any engine
    store = OutputStore(store_dir, generator, meta)
    pending = [r for r in records if r["instruction"] not in store.records]
    if pending:
        engine, tok = load_engine(model_spec, settings, device, cache_dir)
        pending.sort(key=lambda r: len(r["instruction"]), reverse=True)
        with tqdm(total=len(pending), desc=f"generate {generator}", unit="output") as progress:
            for i in range(0, len(pending), settings.batch_size):
                batch = pending[i : i + settings.batch_size]
                answers = answer(engine, tok, [r["instruction"] for r in batch], settings)
                outputs = as_model_outputs(
                    [{**r, "output": str(a)} for r, a in zip(batch, answers, strict=True)],
                    generator)
                store.add([{**o, "truncated": getattr(a, "truncated", None)}
                           for o, a in zip(outputs, answers, strict=True)])
                progress.update(len(batch))  # done / total, elapsed and ETA (on stderr)
        del engine
    return [store.records[r["instruction"]] for r in records]
