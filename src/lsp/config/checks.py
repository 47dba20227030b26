"""The building blocks of the config schema (lsp.config): constrained field types with our own
one-line reasons, and the check of a Hydra `_target_` node against its target's signature (its keys
must be parameters, those without a default must be given, annotated ones are type-checked).

`ConfigError` lives here, the lowest module of the package, so that every part can raise it;
`lsp.config` re-exports it (and the field types other modules import: PosInt, NonNegInt, ...).
"""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, StrictInt, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from lsp.errors import InputError


class ConfigError(InputError):
    pass


# --------------------------------------------------------------------------- field types


def rule(ok, why: str) -> AfterValidator:
    """A constraint with our own one-line reason (pydantic's text for the type errors)."""

    def check(value):
        if not ok(value):
            raise PydanticCustomError("lsp_rule", why)
        return value

    check.why = why  # the configuration reference prints it as the allowed values
    return AfterValidator(check)


def choice(*options) -> Any:
    return Annotated[Any, rule(lambda v: v in options, f"expected one of {list(options)}")]


# Integer keys are strict: a float (`max_new_tokens=1e9` on the command line is one) or a bool is
# refused at the boundary rather than coerced, so the code never meets a float where it counts.
PosInt = Annotated[StrictInt, rule(lambda v: v >= 1, "must be >= 1")]
NonNegInt = Annotated[StrictInt, rule(lambda v: v >= 0, "must be >= 0")]
PosFloat = Annotated[float, rule(lambda v: v > 0, "must be > 0")]
NonNegFloat = Annotated[float, rule(lambda v: v >= 0, "must be >= 0")]
Name = Annotated[str, rule(lambda v: bool(v.strip()), "must be a non-empty string")]
Temperature = Annotated[float, rule(lambda v: v > 0, "must be > 0")]
TopP = Annotated[float, rule(lambda v: 0 < v <= 1, "must be in (0, 1]")]
Engine = choice("lsp", "hf", "vllm")
Dtype = choice("float32", "bfloat16")
Amp = choice("auto", "bfloat16", "none")

ON_POLICY = ("the trained roles must sample from the distribution their log-probs are taken "
             "under (logits / temperature): use top_p=1.0 and top_k=0 (temperature may vary)")
# Training and reference log-probs (so the gradient and the KL) are taken under logits /
# temperature; a truncating sampler would make them those of another distribution (off-policy),
# and pi_ref may give a sampled token probability 0 there (an infinite KL). So the trained roles
# sample untruncated, at any temperature.
OnPolicyTopP = Annotated[TopP, rule(lambda v: v == 1.0, ON_POLICY)]
OnPolicyTopK = Annotated[NonNegInt, rule(lambda v: v == 0, ON_POLICY)]

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def target_node(*injected: str) -> Any:
    """A `_target_` node whose schema is its target's signature; `injected`: parameters the code
    passes itself (never in the config)."""
    return Annotated[dict, AfterValidator(lambda node: _check_target(node, set(injected)))]


# --------------------------------------------------------------------------- _target_ nodes


def _check_target(node: dict, injected: set[str], prefix: str = "") -> dict:
    """Check a `_target_` node against its target's signature (module doc)."""
    from hydra._internal.utils import _locate  # hydra.utils.get_object, without its error log

    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        raise _key_error(f"{prefix}_target_", f"={target!r}: must name a class or function")
    try:
        obj = _locate(target)
    except Exception as err:  # ImportError, AttributeError, ...: the first line of Hydra's text
        why = " ".join(str(err).split())
        raise _key_error(f"{prefix}_target_", f"={target!r}: cannot be imported ({why})") from None
    params, open_kwargs, hints = _signature(obj)
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key not in params and not open_kwargs:
            raise _key_error(f"{prefix}{key}", f": unknown key for {target} (its parameters: "
                                               f"{', '.join(p for p in params if p not in injected)})")
        if isinstance(value, dict):
            _check_nested(value, f"{prefix}{key}.")
        elif key in hints:
            _check_type(value, hints[key], f"{prefix}{key}")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in node and p.name not in injected]
    if missing and not node.get("_partial_"):
        raise _key_error(f"{prefix}{missing[0]}", f": missing: {target} needs it")
    return node


def _check_nested(value: dict, prefix: str) -> None:
    """A dict inside a target node: another target node, or a mapping that may hold some."""
    if "_target_" in value:
        _check_target(value, {"pool"}, prefix)
        return
    for key, sub in value.items():
        if isinstance(sub, dict):
            _check_nested(sub, f"{prefix}{key}.")


def _signature(obj) -> tuple[dict, bool, dict]:
    """(named parameters, whether **kwargs are open, resolvable annotations) of a callable; a
    class that forwards **kwargs to its base takes the base's parameters too."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict = {}
    chain = [c for c in inspect.getmro(obj) if c is not object] if inspect.isclass(obj) else [obj]
    for item in chain:
        fn = item.__init__ if inspect.isclass(item) else item
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, True, hints
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, p)
        try:
            for name, ann in typing.get_type_hints(fn, include_extras=True).items():
                hints.setdefault(name, ann)
        except Exception:  # unresolvable annotations (forward refs): no type check for them
            pass
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, False, hints
        if not inspect.isclass(obj):
            break
    return params, True, hints


def _check_type(value, annotation, key: str) -> None:
    try:
        adapter = TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot check (a tensor, a module): skipped
        return
    try:
        checked = adapter.validate_python(value)
    except ValidationError as err:
        raise _key_error(key, f"={value!r}: {err.errors()[0]['msg']}") from None
    if isinstance(value, float) and type(checked) is int:  # a plain `int` parameter coerced 1e9
        raise _key_error(key, f"={value!r}: Input should be a valid integer, not a float")


def _key_error(key: str, text: str) -> PydanticCustomError:
    return PydanticCustomError("lsp_key", "{text}", {"key": key, "text": text})


def _typed(value, kind, key: str):
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {key}={value!r}: {err.errors()[0]['msg']}") from None
