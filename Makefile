# Two commands set everything up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is enough to run and test the service; a GPU machine
# can install a CUDA build instead: `make TORCH=torch install`.
TORCH ?= torch==2.13.0

.PHONY: run test install install-dev lint typecheck clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files record which install ran, so `make test` after `make run` adds the dev extras.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]" -e clients/python
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/jvp-service serve

test: install-dev
	$(BIN)/python -m pytest

# Throughput and latency against the peers (needs wrk: apt-get install -y wrk); writes
# docs/benchmarks.md. `make bench BENCH_ARGS=--quick` for a short run.
bench: install-dev
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: install-dev
	$(BIN)/ruff check app tests clients bench
	$(BIN)/lint-imports
	$(BIN)/mypy
	cd clients/python && ../../$(BIN)/mypy

clean:
	rm -rf $(VENV)
