"""`python -m lsp.report`: the study report (implementation: `lsp.study.report`)."""

from lsp.study.report import main

if __name__ == "__main__":
    main()
