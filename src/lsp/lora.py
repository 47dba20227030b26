"""LoRA adapters on the policy (`model.lora`, PEFT; docs/gpu.md).

With `model.lora.r > 0` the policy is the base model with low-rank adapters on
`target_modules`: W x + (alpha / r) B A x, only A and B trained (the optimiser holds state for
them alone). The object that trains, samples and is checkpointed is the base model's own
transformers class with PEFT's LoRA layers inside (`peft_model.base_model.model`), so every code
path that takes a causal LM (the log-prob passes, the `lsp` engine, the fused LM head) takes it
unchanged; its PEFT wrapper is kept beside it (`peft_of`).

pi_ref is that same model with its adapters disabled (`adapters_disabled`: PEFT's
`disable_adapter()`), not a second copy: exactly the base weights, frozen, by construction. A
self-reward or LLM judge that names the policy's model gets it too (`ModelPool.share`) and runs
inside the same context (lsp.selfplay.module).

Checkpoints (`save`): the merged model W + (alpha / r) B A at the top of the folder, a normal
transformers folder that `AutoModelForCausalLM.from_pretrained` (and vLLM, selection,
evaluation, IFEval) loads, plus the adapter in `adapter/` (PEFT's format), which a resume loads
onto the base model. A bare adapter folder given as a model spec is merged once into the model
cache (`merged_folder`, from lsp.models.resolve_model). vLLM gets the merged weights at every
push (`merged_state_dict`), computed without merging in place, so the adapters that train are
never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from lsp.models import _atomic_build, _write_marker

PEFT_ATTR = "_lsp_peft"  # the PEFT wrapper, in the model's __dict__ (not a submodule: no cycle)
ADAPTER_DIR = "adapter"  # a checkpoint's adapter sub-folder


def add_adapters(model: nn.Module, r: int, alpha: float, dropout: float,
                 target_modules: list[str], adapter_folder: str | Path | None = None
                 ) -> nn.Module:
    """`model` with LoRA adapters (module doc): fresh ones (B = 0: the policy starts equal to the
    base model), or the trained ones in `adapter_folder` (a resume). Returns the model to train."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_folder is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_folder), is_trainable=True)
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=list(target_modules), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    inner.__dict__[PEFT_ATTR] = peft_model
    # gradient checkpointing (reentrant) needs an input that requires grad to reach the
    # adapters through a frozen embedding
    inner.enable_input_require_grads()
    return inner


def peft_of(model: nn.Module):
    """The PEFT wrapper of a model made by `add_adapters`, else None."""
    return model.__dict__.get(PEFT_ATTR)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside: `model` computes its base model, pi_ref (adapters off, and eval mode: no adapter
    dropout); its mode is restored after. A no-op for a model without adapters."""
    peft_model = peft_of(model)
    if peft_model is None:
        yield
        return
    training = model.training
    model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        model.train(training)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's state dict (its own names) with W + (alpha / r) B A for every adapted
    layer, for a model made by `add_adapters`; the model's state dict for any other. Nothing is
    merged in place: the adapters that train stay as they are."""
    state = model.state_dict()
    if peft_of(model) is None:
        return state
    deltas = {}
    for name, layer in _lora_layers(model).items():
        if layer.disable_adapters:
            continue
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                key = f"{name}.base_layer.weight"
                deltas[key] = deltas.get(key, 0) + layer.get_delta_weight(adapter)
    out = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        if key in deltas:
            tensor = tensor + deltas[key].to(tensor.dtype)
        out[key.replace(".base_layer.", ".")] = tensor
    return out


def save(model: nn.Module, folder: Path, state_dict: dict | None = None) -> None:
    """Write `model` into `folder` as a transformers folder (with adapters: merged, plus the
    adapter in folder/adapter; module doc). `state_dict`: full tensors of a sharded model."""
    peft_model = peft_of(model)
    if peft_model is None:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    model.save_pretrained(folder, state_dict=merged_state_dict(model))
    peft_model.save_pretrained(folder / ADAPTER_DIR)


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def merged_folder(adapter: Path, cache: Path) -> Path:
    """A bare adapter folder (PEFT's adapter_config.json + weights) merged into its base model,
    built once into `cache` (keyed by the adapter's files), a folder every loader takes."""
    import json

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    digest = hashlib.sha256()
    for file in sorted(adapter.iterdir()):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())

    def build(tmp: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from lsp.models import load_tokenizer, resolve_model

        base_path = resolve_model(base, cache)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(tmp)
        tok = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
        load_tokenizer(str(tok)).save_pretrained(tmp)
        _write_marker(tmp, {"adapter": str(adapter), "base": base})

    return _atomic_build(cache / "merged" / f"{adapter.name}-{digest.hexdigest()[:12]}", build)


def parameter_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of `model`'s frozen base weights (its adapters excluded), stored in `dtype` (None: as
    they are): what a separate reference copy of them would take."""
    total = 0
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * (p.element_size() if dtype is None else dtype.itemsize)
    return total
