"""Compose conf/pipeline.yaml (+ Hydra overrides) into params.yaml exactly as `dvc exp run` does
(DVC's own compose_and_dump), for plain `dvc repro`: python pipelines/compose_params.py study=smoke"""

from __future__ import annotations

import sys
from pathlib import Path

from dvc.utils.hydra import compose_and_dump

from lsp.errors import exit_on_input_error


@exit_on_input_error
def main(overrides: list[str]) -> None:
    conf = Path(__file__).resolve().parents[1] / "conf"
    compose_and_dump(Path("params.yaml"), str(conf), None, "pipeline", "", overrides)
    print(f"params.yaml composed from conf/pipeline.yaml {' '.join(overrides)}".rstrip())


if __name__ == "__main__":
    main(sys.argv[1:])
