"""The end-of-line comments of the shipped YAML (conf/), by the dotted key they document: the
configuration reference (lsp.config.reference) shows them for the keys of `_target_` nodes, which
have no schema of their own to carry a description. conf/ is block-style YAML with `key: value  #
why` lines, read here line by line (indentation gives the nesting) rather than by a YAML library,
which would drop the comments."""

from __future__ import annotations

import re
from pathlib import Path

KEY_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*):(.*)$")


def file_comments(text: str, prefix: str = "") -> dict[str, str]:
    """{dotted key: the first line of its comment} of one YAML file's block-style keys."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the keys enclosing this line
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if "#" in rest and not rest.lstrip().startswith(("'", '"', "{", "[")):
            found[prefix + ".".join(k for _, k in stack)] = rest.split("#", 1)[1].strip()
    return found


def conf_comments(conf: Path) -> dict[str, str]:
    """Every file of conf/ under the key its group places it (conf/eval/judge/x.yaml: eval.judge);
    `# @package _global_` files (experiments, studies) at the top. The group files come first, so
    a key's comment is the one where it is defined, not an overlay's."""
    found: dict[str, str] = {}
    files = sorted(conf.rglob("*.yaml"), key=lambda p: ("_global_" in p.read_text(), str(p)))
    for path in files:
        text = path.read_text()
        group = path.parent.relative_to(conf).parts
        prefix = "" if "@package _global_" in text or not group else ".".join(group) + "."
        for key, comment in file_comments(text, prefix).items():
            found.setdefault(key, comment)
    return found
