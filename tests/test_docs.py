"""The documentation: every schema key has a description, the generated configuration reference
is current and lists every composed key, the site builds in strict mode (a broken internal link,
a missing page or any warning fails), and the README stays short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsp.config import reference
from lsp.config.schema import EvaluateConfig, IFEvalConfig, SelectConfig, StudyParams, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = [TrainConfig, SelectConfig, EvaluateConfig, IFEvalConfig, StudyParams]


def test_every_schema_key_has_a_description():
    missing = sorted({f"{model.__name__}.{name}" for schema in SCHEMAS
                      for model, name, info in reference.all_fields(schema)
                      if not (info.description or "").strip()})
    assert not missing, f"Field(description=...) missing for: {', '.join(missing)}"


@pytest.fixture(scope="module")
def fresh_page() -> str:
    return reference.render()


def test_the_configuration_reference_is_current(fresh_page):
    committed = reference.PAGE.read_text()
    assert committed == fresh_page, (
        "docs/reference/configuration.md is stale: run `make docs-reference` and commit it")


@pytest.mark.parametrize(("config", "overrides"), [
    ("train", ["experiment=paper_llama3b"]), ("train", ["reward=judge_constraints"]),
    ("evaluate", ["eval/judge=openai_compatible"]), ("pipeline", ["study=paper"]),
])
def test_every_composed_key_is_in_the_reference(fresh_page, config, overrides):
    """The check a reader makes: a key from a composed config, looked up in the page."""
    keys = reference.flatten(reference.compose(config, overrides))
    absent = [k for k in keys if f"`{k}`" not in fresh_page]
    assert not absent, absent


def test_the_site_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").exists()


def test_the_readme_is_short_and_says_how_to_serve_the_docs():
    text = (REPO / "README.md").read_text()
    assert len(text) <= 15_000, len(text)
    assert "make docs-serve" in text and "make install" in text and "make test" in text


def test_the_yaml_comments_are_read_by_nested_key():
    from lsp.config.conf_comments import file_comments

    text = ("a:                # the a node\n"
            "  b: 1            # b's why\n"
            "  c: {d: 2}       # flow style: not read\n"
            "e: '#not a comment'\n"
            "f: 3  # f's why\n"
            "  # a continuation line\n")
    assert file_comments(text, "g.") == {"g.a": "the a node", "g.a.b": "b's why", "g.f": "f's why"}
