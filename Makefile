# `make demo` and `make test` set everything up on a fresh machine: .venv is created when missing,
# torch is installed first and pinned (an unpinned torch would pull a multi-GB CUDA build), then the
# project in editable mode with its dev extra.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.tunesmith-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-slow test-all lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tunesmith.demo

# Two pytest workers, each file on one (--dist loadfile keeps a file's module fixtures in one process): on the
# 2-core CI machine the suite took 8 min instead of 11.5 min serially (both green, 2026-11-28).
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -n $(PYTEST_WORKERS) --dist loadfile tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "slow or not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
