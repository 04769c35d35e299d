# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
# `make gpu-check` runs on a GPU machine with the Python that has a CUDA build of torch (GPU_PYTHON), no .venv.
PYTHON ?= python3
GPU_PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean gpu-check

$(STAMP): pyproject.toml requirements-ci.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-ci.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokensieve demo

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
