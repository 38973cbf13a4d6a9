# One place for the setup steps; README's two commands are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch on this disk; installed before the rest so that the
# `torch>=2.4` range in pyproject.toml is already met and no CUDA build is pulled.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup run test bench ui clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup
	. $(BIN)/activate && dvc repro

test: setup
	. $(BIN)/activate && pytest -q

bench: setup
	. $(BIN)/activate && python bench/bench_engine.py

ui: setup
	. $(BIN)/activate && archlab ui

clean:
	rm -rf data runs mlflow.db mlruns mlartifacts sweeps
