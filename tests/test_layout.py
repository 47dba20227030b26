"""The layout rules of docs/architecture.md, checked on the source: file and function sizes, and
that a package never imports one above it at module level (the named exceptions aside)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lsp"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
REASON = "Long because"  # a docstring that says why a function is longer

# Lower layers first; a module may import its own layer or lower ones at module level.
LAYERS = {
    "errors": 0, "chat": 0, "io": 1, "models": 1, "lora": 2, "config": 2, "tracking": 2, "headline": 2,
    "engines": 3,
    "selfplay": 4, "evaluation": 5, "study": 6,
    "train": 7, "evaluate": 7, "select": 7, "ifeval": 7, "report": 7,
}
# (importer layer, imported module) pairs docs/architecture.md names as exceptions.
ALLOWED_UP = {
    ("engines", "lsp.selfplay.records"),  # the Rollout record engines return (a leaf module)
    ("engines", "lsp.selfplay.logprobs"),  # prompt grouping and the cache argument (leaf maths)
    ("selfplay", "lsp.evaluation.ifeval"),  # the IFEval checker registry: one copy of the checkers
    ("config", "lsp.selfplay.advantages"),  # the choices the schema accepts, named where they act
    ("config", "lsp.selfplay.losses"),
}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _layer(name: str) -> str:
    return name.split(".")[1] if name.count(".") else name


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_file_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: over {MAX_FILE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            assert n <= MAX_FUNCTION_LINES or REASON in doc, (
                f"{path.name}:{node.lineno} {node.name} is {n} lines without a reason")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_level_import_from_a_higher_layer(path):
    rel = path.relative_to(SRC.parent).with_suffix("")
    me = _layer(".".join(rel.parts).removesuffix(".__init__"))
    for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are inside
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("lsp."):
            continue
        them = _layer(node.module)
        if LAYERS[them] > LAYERS[me]:
            assert (me, node.module) in ALLOWED_UP, f"{rel}: imports {node.module} (a higher layer)"


def test_the_layer_table_covers_every_top_level_name():
    names = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if p.name != "__init__.py" and not p.name.startswith("__") and
             (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert names == set(LAYERS)
