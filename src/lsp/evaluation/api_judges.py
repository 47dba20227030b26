"""Strong judges through an OpenAI-compatible API, with alpaca-eval's own evaluator configs.

- `AlpacaEvalJudge`: one of alpaca-eval's evaluator configs by name; the default
  `weighted_alpaca_eval_gpt4_turbo` is the AlpacaEval 2.0 judge (needs `OPENAI_API_KEY`).
- `OpenAICompatibleJudge`: the same protocol (alpaca-eval's prompt and logprob parser) on any
  OpenAI-compatible endpoint and model name, e.g. a vLLM-served Llama-4-Maverick as in the paper.
  The endpoint's key comes from the environment (`OPENAI_API_KEY`; a server without auth accepts
  any value, e.g. `EMPTY`) and is never written to disk.

Both cache their annotations under `cache_dir` (not inside the installed alpaca-eval package, where
alpaca-eval's "auto" cache would go).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lsp.errors import InputError
from lsp.io import slug


class JudgeUnavailableError(InputError, RuntimeError):
    """The configured judge cannot run here; the message says what to set."""


def alpaca_eval_configs_dir() -> Path:
    from alpaca_eval import constants

    return Path(constants.EVALUATORS_CONFIG_DIR)


class AlpacaEvalJudge:
    reports_both_orders = False  # one verdict per pair; the sanity check judges swapped pairs too

    def __init__(self, annotators_config: str = "weighted_alpaca_eval_gpt4_turbo",
                 cache_dir: str = "artifacts/judge_cache", api_key_env: str | None = "OPENAI_API_KEY",
                 chunksize: int = 64):
        self.annotators_config = annotators_config
        self.cache_dir, self.api_key_env, self.chunksize = Path(cache_dir), api_key_env, chunksize
        self.name = slug(Path(annotators_config).name)

    def check_available(self) -> None:
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise JudgeUnavailableError(
                f"Judge '{self.name}' calls an OpenAI-compatible API and needs ${self.api_key_env}. "
                "Set it, or judge offline with eval/judge=local_hf."
            )

    @property
    def caching_path(self) -> Path:
        return self.cache_dir / f"{self.name}.json"

    def annotator_kwargs(self) -> dict:
        self.check_available()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # An absolute config folder: alpaca-eval then writes annotations.json into out_dir itself
        # (a bare name would add a sub-folder), and loads the config as it would by name.
        config = Path(self.annotators_config)
        if not config.is_absolute():
            config = alpaca_eval_configs_dir() / config
        return {"annotators_config": str(config), "caching_path": str(self.caching_path)}

    def describe(self) -> dict:
        return {"kind": "alpaca_eval", "annotator": self.name, "cache": str(self.caching_path)}


class OpenAICompatibleJudge(AlpacaEvalJudge):
    def __init__(self, model_name: str, base_url: str | None = None,
                 base_config: str = "weighted_alpaca_eval_gpt4_turbo", requires_chatml: bool = True,
                 cache_dir: str = "artifacts/judge_cache", api_key_env: str | None = "OPENAI_API_KEY",
                 chunksize: int = 64):
        super().__init__(base_config, cache_dir, api_key_env, chunksize)
        self.model_name, self.base_url, self.base_config = model_name, base_url, base_config
        self.requires_chatml = requires_chatml
        self.name = slug(f"{Path(base_config).name}__{model_name}")

    def write_config(self) -> Path:
        """alpaca-eval's config for `base_config` with our model and endpoint: a folder with a
        `configs.yaml` that `PairwiseAnnotator` loads like any evaluator config."""
        base_dir = alpaca_eval_configs_dir()
        base = yaml.safe_load((base_dir / self.base_config / "configs.yaml").read_text())
        (config,) = base.values()
        config = dict(config)
        config["prompt_template"] = str(base_dir / config["prompt_template"])  # absolute
        kwargs = dict(config.get("completions_kwargs", {}))
        kwargs.update(model_name=self.model_name, requires_chatml=self.requires_chatml)
        if self.base_url:
            kwargs["openai_api_base"] = self.base_url
        config["completions_kwargs"] = kwargs
        folder = self.cache_dir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "configs.yaml").write_text(yaml.safe_dump({self.name: config}, sort_keys=False))
        return folder

    def annotator_kwargs(self) -> dict:
        self.check_available()
        return {"annotators_config": str(self.write_config()), "caching_path": str(self.caching_path)}

    def describe(self) -> dict:
        return {**super().describe(), "kind": "openai_compatible", "model": self.model_name,
                "base_url": self.base_url}
