# One command each on a fresh clone: `make demo`, `make test`. Both build .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := loca_lightning examples tests benchmarks tools

.PHONY: install test demo experiment bench lint clean

install: $(STAMP)

# torch/torchvision are pinned and installed first: a bare `torch` requirement would pull another multi-GB build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,examples]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m examples.demo --out runs/demo

experiment: $(STAMP)
	$(PY) -m examples.demo --experiment --out runs/experiment

bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench_results/bench.json

# Fails on a lint finding or on any file that `ruff format` would change (`ruff format` fixes the latter).
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

clean:
	rm -rf runs lightning_logs bench_results .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
