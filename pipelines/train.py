"""DVC stage `train@<arm>`: self-play training of one study arm into artifacts/train/<arm>/
(checkpoints/, history.csv for the DVC plots, samples.jsonl, metrics.json for DVC metrics)."""

from __future__ import annotations

import json
import sys

from lsp.errors import exit_on_input_error
from lsp.study import load_params, mark_complete, resume_or_clear, train_config, train_dir
from lsp.train import train


@exit_on_input_error
def main(arm: str) -> None:
    cfg = train_config(load_params(), arm)
    # a DVC rerun after a kill resumes (same config and code); any other rerun starts afresh
    cfg.resume = resume_or_clear(cfg, arm)
    result = train(cfg)
    summary = {k: v for k, v in result["metrics"].items()
               if k.split("/")[0] in ("solver", "challenger", "self_reward", "kl", "rollout")}
    summary["global_step"] = result["global_step"]
    (train_dir(arm) / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    mark_complete(arm)


if __name__ == "__main__":
    main(sys.argv[1])
