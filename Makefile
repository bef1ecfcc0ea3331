# Two commands set everything up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: the version the tests run on, named once in torch-version.txt (the Dockerfile reads
# it too). The CPU build by default, from PyTorch's CPU wheel index (PyPI's own Linux wheel
# carries CUDA, ~3 GB); on an NVIDIA machine `make run GPU=1` installs PyPI's CUDA build
# (after `make clean`, if .venv exists).
TORCH_VERSION := $(shell cat torch-version.txt)
GPU ?= 0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(GPU),1)
TORCH_INSTALL := "torch==$(TORCH_VERSION)"
else
# Two retries, not pip's five: where the index cannot be reached (an offline mirror with the
# wheel on disk) five retries per package cost minutes before pip falls back to what it has.
TORCH_INSTALL := --retries 2 --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"
endif

.PHONY: run test install install-dev lint typecheck clean bench chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files record which install ran, so `make test` after `make run` adds the dev extras.
$(VENV)/.installed: pyproject.toml torch-version.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_INSTALL)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml clients/python/pyproject.toml torch-version.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_INSTALL)
	$(BIN)/pip install --quiet -e ".[dev]" -e clients/python
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/jvp-service serve

# The docs' browser test (tests/test_docs_browser.py) needs Debian's chromium.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| (echo "make test needs chromium: sudo apt-get install -y chromium" >&2; exit 1)

test: install-dev chromium
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
