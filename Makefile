# The two commands a new user needs (see README.md):
#   make demo   — set up a virtualenv and run the whole pipeline on synthetic data (CPU)
#   make test   — set up the same virtualenv (plus test extras) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test demo test lint

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev,dali,tensorboard,dask,bench]'
	touch $@

setup: $(VENV)/.base

setup-test: $(VENV)/.test

demo: setup
	$(VENV)/bin/vctmae demo --out demo/

test: setup-test
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff format --check vctmae tests benchmarks
	$(VENV)/bin/ruff check vctmae tests benchmarks
