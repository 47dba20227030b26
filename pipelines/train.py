"""DVC stage `train@<arm>`: self-play training of one study arm into artifacts/train/<arm>/
(checkpoints/, history.csv for the DVC plots, samples.jsonl, metrics.json for DVC metrics)."""

from __future__ import annotations

import json
import sys

from lsp.errors import exit_on_input_error
from lsp.study import load_params, train_config, train_dir
from lsp.train import train


@exit_on_input_error
def main(arm: str) -> None:
    result = train(train_config(load_params(), arm))
    summary = {k: v for k, v in result["metrics"].items()
               if k.split("/")[0] in ("solver", "challenger", "self_reward", "kl", "rollout")}
    summary["global_step"] = result["global_step"]
    (train_dir(arm) / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
