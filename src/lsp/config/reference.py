"""The configuration reference, generated: `python -m lsp.config.reference [path]` (or
`make docs-reference`) writes docs/reference/configuration.md.

It walks the pydantic schema (lsp.config.schema: every key's type, allowed values and
`Field(description=...)`) beside the shipped Hydra defaults (conf/, composed with Hydra's compose
API, interpolations left unresolved so the page is the same on every machine): the default of
each key, and the value each experiment or study sets where it differs. A `_target_` node (reward,
self-reward, optimiser, callbacks, strategies, judge) has no schema of its own: its keys are its
target's parameters (lsp.config.checks), listed with the annotation and default of the signature.
tests/test_docs.py fails when a field has no description or the committed page is stale.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel

from lsp.config.conf_comments import conf_comments
from lsp.config.schema import EvaluateConfig, IFEvalConfig, SelectConfig, StudyParams, TrainConfig

REPO = Path(__file__).resolve().parents[3]
CONF = REPO / "conf"
PAGE = REPO / "docs" / "reference" / "configuration.md"


def _variants(group: str, default: str) -> dict[str, list[str]]:
    """The default column, then one per file of conf/<group>/ (every experiment, every study)."""
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    out = {default: []}
    out |= {f"{group}={n}": [f"{group}={n}"] for n in names if f"{group}={n}" not in default}
    return out


# (title, config file, schema, variant column -> overrides); the first variant is the default.
ENTRY_POINTS = [
    ("python -m lsp.train", "train", TrainConfig, _variants("experiment", "default")),
    ("python -m lsp.select", "select", SelectConfig, {"default": ["run_dir=RUN"]}),
    ("python -m lsp.evaluate", "evaluate", EvaluateConfig,
     {"default": [], "eval=quick": ["eval=quick"]}),
    ("python -m lsp.ifeval", "ifeval", IFEvalConfig, {"default": []}),
    ("The study: params.yaml (dvc repro)", "pipeline", StudyParams,
     _variants("study", "study=cpu (default)")),
]
# The choices of the _target_ groups, each listed with its target's parameters.
GROUPS = [("train", "reward", "reward"), ("evaluate", "eval/judge", "eval.judge")]


@dataclass
class Row:
    key: str
    type: str
    allowed: str
    description: str
    values: list[Any]  # one per variant; MISSING where the key is absent


MISSING = object()
# algo.self_reward's own keys beside its _target_ node (lsp.config._self_reward)
SELF_REWARD_KEYS = {
    "enabled": ("bool", "", "R_Q on (LSP) or off (LSP-Zero); off, the node below is not built"),
    "weight": ("float", "", "R_Q's weight in the Solver's reward (the paper adds it unscaled)"),
}


# --------------------------------------------------------------------------- the schema


def schema_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, annotation, FieldInfo) of every leaf field; sections are followed, a
    `dict[str, Section]` under the key `<name>`."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(info.annotation)
        if section is not None:
            yield from schema_fields(section, f"{key}.")
        elif (mapped := _mapped_section(info.annotation)) is not None:
            yield from schema_fields(mapped, f"{key}.<name>.")
        else:  # pydantic keeps a field's Annotated constraints apart, in `metadata`
            yield key, Annotated[info.annotation, *info.metadata] if info.metadata \
                else info.annotation, info


def all_fields(model: type[BaseModel], seen: set | None = None):
    """(model, field name, FieldInfo) of every field of `model` and the sections under it."""
    seen = set() if seen is None else seen
    for name, info in model.model_fields.items():
        yield model, name, info
        for sub in (_section(info.annotation), _mapped_section(info.annotation)):
            if sub is not None and sub not in seen:
                seen.add(sub)
                yield from all_fields(sub, seen)


def _section(ann) -> type[BaseModel] | None:
    ann = _unwrap(ann)
    return ann if inspect.isclass(ann) and issubclass(ann, BaseModel) else None


def _mapped_section(ann) -> type[BaseModel] | None:
    ann = _unwrap(ann)
    if typing.get_origin(ann) is dict:
        return _section(typing.get_args(ann)[1])
    return None


def _unwrap(ann):
    """Annotated[X, ...] -> X; X | None -> X."""
    while True:
        if typing.get_origin(ann) is Annotated:
            ann = typing.get_args(ann)[0]
        elif _is_union(ann) and type(None) in typing.get_args(ann):
            rest = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(rest) > 1:
                return ann
            ann = rest[0]
        else:
            return ann


def _is_union(ann) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def type_name(ann) -> str:
    """A short, readable type: int, float, str, bool, list[str], mapping, choice, int or str..."""
    if typing.get_origin(ann) is Annotated:
        base = typing.get_args(ann)[0]
        return "choice" if base is Any and _rules(ann) else type_name(base)
    if typing.get_origin(ann) is typing.Literal:
        return "choice"
    if _is_union(ann):
        names = [type_name(a) for a in typing.get_args(ann) if a is not type(None)]
        optional = " or null" if type(None) in typing.get_args(ann) else ""
        return " or ".join(dict.fromkeys(names)) + optional
    origin = typing.get_origin(ann)
    if origin is dict or ann is dict:
        return "mapping"
    if origin is list:
        return f"list[{type_name(typing.get_args(ann)[0])}]"
    if ann is Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def allowed(ann) -> str:
    """The allowed values: the reasons of the `rule` constraints (lsp.config.checks.rule)."""
    return "; ".join(dict.fromkeys(_rules(ann)))


def _rules(ann) -> list[str]:
    found = []
    if typing.get_origin(ann) is Annotated:
        base, *meta = typing.get_args(ann)
        found += [m.func.why for m in meta if hasattr(getattr(m, "func", None), "why")]
        found = _rules(base) + found
    elif typing.get_origin(ann) is typing.Literal:
        found.append(f"expected one of {list(typing.get_args(ann))}")
    elif _is_union(ann):
        for arg in typing.get_args(ann):
            found += _rules(arg)
    return found


# --------------------------------------------------------------------------- the shipped configs


def compose(config_name: str, overrides: list[str]) -> dict:
    """The shipped config as the entry point composes it, interpolations unresolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; an empty mapping is a leaf."""
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= flatten(value, f"{prefix}{key}.")
    return out


def lookup(flat: dict[str, Any], key: str) -> Any:
    return flat.get(key, MISSING)


# --------------------------------------------------------------------------- rows


def section_rows(schema: type[BaseModel], variants: list[dict]) -> list[Row]:
    """One row per schema leaf; the leaves of a mapping field (a `_target_` node, per-arm
    overrides) come from the composed configs, typed by the target's signature where it has one."""
    flats = [flatten(v) for v in variants]
    rows = []
    for key, ann, info in schema_fields(schema):
        for full in _expand(key, flats):
            if _is_mapping(ann):
                rows += _mapping_rows(full, ann, info, variants, flats)
            else:
                rows.append(Row(full, type_name(ann), allowed(ann), info.description or "",
                                [lookup(f, full) for f in flats]))
    return rows


def _expand(key: str, flats: list[dict]) -> list[str]:
    """`arms.<name>.init` -> the composed names (`arms.lsp.init`, ...); the pattern if none."""
    if "<name>." not in key:
        return [key]
    head, tail = key.split(".<name>.")
    names = {k[len(head) + 1:].split(".")[0] for f in flats for k in f if k.startswith(f"{head}.")}
    return [f"{head}.{n}.{tail}" for n in sorted(names)] or [key]


def _is_mapping(ann) -> bool:
    ann = _unwrap(ann)
    return ann is dict or typing.get_origin(ann) is dict


def _mapping_rows(key: str, ann, info, variants: list[dict], flats: list[dict]) -> list[Row]:
    """A mapping field: its own row, then one per composed key under it."""
    rows = [Row(key, type_name(ann), allowed(ann), info.description or "",
                [MISSING if isinstance(lookup(f, key), dict | type(MISSING)) else lookup(f, key)
                 for f in flats])]
    # in the order of the first variant that has them (dict keys keep the composed order)
    under = dict.fromkeys(k for f in flats for k in f if k.startswith(f"{key}."))
    for sub in under:
        kind, allowed_values, about = _parameter(variants, sub)
        note = _comments().get(sub)  # the shipped YAML's comment on the key (conf_comments)
        about = f"{note} ({about})" if note and about else note or about
        rows.append(Row(sub, kind, allowed_values, about, [lookup(f, sub) for f in flats]))
    return rows


@functools.cache
def _comments() -> dict[str, str]:
    return conf_comments(CONF)


def _parameter(variants: list[dict], key: str) -> tuple[str, str, str]:
    """(type, allowed, description) of `key` inside a `_target_` node: from the signature of the
    nearest target above it (the leaf itself, or the parameter the path enters that target by)."""
    from hydra._internal.utils import _locate

    from lsp.config.checks import _signature

    parts = key.split(".")
    if parts[-1] == "_target_":
        return "str", "", "the class or function Hydra builds (checked: it must import)"
    if parts[-2:-1] == ["self_reward"] and parts[-1] in SELF_REWARD_KEYS:
        return SELF_REWARD_KEYS[parts[-1]]
    for variant in variants:
        if key not in flatten(variant):  # the variant that sets the key names its target
            continue
        chain = [variant]
        for part in parts[:-1]:
            chain.append(chain[-1].get(part) if isinstance(chain[-1], dict) else None)
        depth = next((d for d in range(len(parts) - 1, -1, -1)
                      if isinstance(chain[d], dict) and "_target_" in chain[d]), None)
        if depth is None or parts[-1].startswith("_"):
            continue
        target, param = chain[depth]["_target_"], parts[depth]
        inside = "" if depth == len(parts) - 1 else f"inside `{param}`, "
        try:
            params, _, hints = _signature(_locate(target))
        except Exception:  # a target that does not import here: named, untyped
            return "", "", f"{inside}parameter of `{target}`"
        p = params.get(param)
        default = "" if p is None or p.default is inspect.Parameter.empty or inside \
            else f", signature default `{_fmt(p.default)}`"
        kind = type_name(hints[param]) if param in hints and not inside else ""
        return kind, allowed(hints[param]) if kind else "", \
            f"{inside}parameter of `{target}`{default}"
    return "", "", "a key of the node"


# --------------------------------------------------------------------------- the page


def _fmt(value: Any) -> str:
    if value is MISSING:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    text = _fmt(value)
    return f"`{_cell(text)}`" if text else ""


def table(rows: list[Row], names: list[str]) -> list[str]:
    """Key | default | the other variants' values where they differ | type, allowed, description."""
    lines = ["| key | default | set by | type, allowed values: description |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        default, *others = r.values
        differs = [f"{n}: {_code(v) or 'unset'}" for n, v in zip(names[1:], others, strict=True)
                   if _fmt(v) != _fmt(default)]
        kind = "; ".join(x for x in (f"*{r.type}*" if r.type else "", r.allowed) if x)
        about = f"{kind}: {r.description}" if kind else r.description
        lines.append(f"| `{r.key}` | {_code(default)} | {'<br>'.join(differs)} | {_cell(about)} |")
    return lines


def entry_point_section(title: str, config: str, schema, variants: dict) -> list[str]:
    composed = [compose(config, o) for o in variants.values()]
    names = list(variants)
    out = [f"## {title}", "", f"Composed from `conf/{config}.yaml`; *set by*: the value each of "
           f"{', '.join(f'`{n}`' for n in names[1:]) or 'no variant'} sets where it differs.", ""]
    rows = section_rows(schema, composed)
    top = [r for r in rows if "." not in r.key and not any(x.key.startswith(f"{r.key}.")
                                                          for x in rows)]
    for section in dict.fromkeys(r.key.split(".")[0] for r in rows if r not in top):
        part = [r for r in rows if r.key.split(".")[0] == section]
        out += [f"### `{section}`", ""] + table(part, names) + [""]
    return out + ["### Top-level keys", ""] + table(top, names) + [""]


def group_section(config: str, group: str, key: str) -> list[str]:
    """Every choice of a `_target_` group (conf/<group>/*.yaml), its keys typed by the target."""
    out = [f"## The `{group}` choices", "", f"Each file of `conf/{group}/` as `{key}` of "
           f"`conf/{config}.yaml` composes it (`{group}=<choice>`).", ""]
    for path in sorted((CONF / group).glob("*.yaml")):
        composed = compose(config, [f"{group}={path.stem}"])
        node = composed
        for part in key.split("."):
            node = node[part]
        rows = _mapping_rows(key, dict, _Info(f"`{group}={path.stem}`"), [composed],
                             [flatten(composed)])
        out += [f"### `{group}={path.stem}`: `{node.get('_target_', '')}`", ""]
        out += table(rows[1:], ["default"]) + [""]
    return out


@dataclass
class _Info:
    description: str


HEADER = """# Configuration reference

Generated by `python -m lsp.config.reference` (`make docs-reference`) from the schema
(`src/lsp/config/schema.py`) and the shipped defaults (`conf/`): do not edit by hand;
`tests/test_docs.py` fails when this page is stale. *allowed* is what the schema checks (a value
outside it is a one-line error naming the key); integer keys refuse floats (`1e9`, `2.5`).
Interpolations (`${...}`) are shown as written: they resolve when the config is composed.
"""


def render() -> str:
    lines = [HEADER]
    for title, config, schema, variants in ENTRY_POINTS:
        lines += entry_point_section(title, config, schema, variants)
    for config, group, key in GROUPS:
        lines += group_section(config, group, key)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
