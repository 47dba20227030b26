"""Markdown building blocks of the study report: tables and fenced model text."""

from __future__ import annotations

import re

from tabulate import tabulate

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control bytes but \t and \n


def _cell(value) -> str:
    # A `|` or a newline in a cell (model text, a file name) would end the cell or the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub Markdown table as report lines (header, rule, one line per row, a blank line).

    tabulate (installed with the pinned dvc and sacrebleu) pads the columns, so the raw report.md
    reads as a table too. The cells come formatted already: `disable_numparse` keeps tabulate from
    reformatting or right-aligning the ones that look like numbers ("3.0e-06", "0.05")."""
    text = tabulate([[_cell(c) for c in r] for r in rows], headers=[_cell(h) for h in header],
                    tablefmt="github", disable_numparse=True)
    return [*text.splitlines(), ""]


def fenced(text: str, limit: int | None = None) -> list[str]:
    """Model text as a code block, cut at `limit` characters: the fence is longer than any
    backtick run inside, since model text may contain ``` itself."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    text = CONTROL.sub("\ufffd", text)  # a model's stray control bytes would garble the page
    cut = text if limit is None or len(text) <= limit else text[:limit] + " [...]"
    return [fence + "text", cut, fence, ""]
