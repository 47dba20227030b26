"""DVC stage `report`: the study report (Markdown + PNG plots) -> artifacts/report/."""

from __future__ import annotations

from pathlib import Path

from lsp.errors import exit_on_input_error
from lsp.study.params import evaluate_dir, load_params, select_dir, train_dir
from lsp.study.report import build_report


@exit_on_input_error
def main() -> None:
    params = load_params()
    arms = list(params.arms)
    path = build_report({a: train_dir(a) for a in arms}, {a: select_dir(a) for a in arms},
                        {a: evaluate_dir(a) for a in arms}, Path("artifacts/report"),
                        f"{params.report.title} ({params.study_name})",
                        ifeval_dir=Path("artifacts/ifeval"))
    print(f"report -> {path}")


if __name__ == "__main__":
    main()
