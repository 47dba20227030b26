"""AlpacaEval evaluation of LSP models, offline or with a strong judge.

- `outputs`: evaluation sets, stratified subsets, resumable batched generation of
  `model_outputs.json` records (`instruction`, `output`, `generator`, `dataset`).
- `judge`: a local Hugging Face pairwise judge plugged into alpaca-eval's own annotator
  (`PairwiseAnnotator` + the shipped `annotators/lsp_local_judge` config), deciding from token
  probabilities in both presentation orders.
- `api_judges`: alpaca-eval's `weighted_alpaca_eval_gpt4_turbo` and any OpenAI-compatible endpoint.
- `scoring`: head-to-head scoring through `alpaca_eval.evaluate` and alpaca-eval's metrics, overall
  and per subset, with ties counted both ways.
- `sanity`: how far a judge can be trusted (known-preference and length-independent pairs).
- `selection`: checkpoint selection on the project's own validation prompts.
- `tracking`: MLflow logging (SQLite store); `runtime`: atomic file writes, name slugs (device and autocast: `lsp.models`).

Submodules are imported explicitly: importing this package loads neither torch nor alpaca-eval.
"""
