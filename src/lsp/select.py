"""`python -m lsp.select run_dir=<training run>`: choose the checkpoint to evaluate.

Every complete checkpoint of the run answers the project's fixed validation prompts (never AlpacaEval
instructions) as the Solver, at the evaluation temperature; the training reward scores the answers;
the highest mean wins. Writes `<out_dir>/selection.json` (every candidate's score and the choice,
read by `python -m lsp.evaluate candidate.selection=...`) and `<out_dir>/answers/`; logs to MLflow.

The reward is the run's own (from the config the trainer saved in `<run_dir>/config.yaml`, or Hydra's
`<run_dir>/.hydra/config.yaml`, when `reward_from_run`), else the composed `reward` group; it is
built as `instantiate(reward_cfg, pool=ModelPool(...))`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lsp.errors import exit_on_input_error
from lsp.evaluation.selection import run_reward_config, select, with_constraints

__all__ = ["run_reward_config", "select", "with_constraints"]


@hydra.main(config_path="../../conf", config_name="select", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    select(cfg)


if __name__ == "__main__":
    main()
