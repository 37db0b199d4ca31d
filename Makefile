# lit_spine - `make help` lists every target. Everything that needs Python depends on `install`,
# so `make sweep` and `make test` work on a machine with nothing installed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LIT := $(VENV)/bin/lit-spine
STAMP := $(VENV)/.installed
SWEEP ?= sweeps/default.yaml
WORKERS ?= 2
PHANTOM_DIR ?= data/phantom
PHANTOM_STUDIES ?= 120

export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: help install test test-all lint format sweep report bench phantom smoke clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv with the pinned dependencies (idempotent, seconds when up to date)

# Two installs at once (`make test` and `make sweep` started together on a fresh clone) would
# run pip twice into one venv and can break it: where flock(1) exists (Linux), the install runs
# under a lock, and the second make rechecks the stamp once it gets the lock.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	@if [ -z "$$LIT_SPINE_INSTALL_LOCKED" ] && command -v flock >/dev/null 2>&1; then \
	  LIT_SPINE_INSTALL_LOCKED=1 flock .install.lock $(MAKE) --no-print-directory $(STAMP); \
	else \
	  set -e; \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  echo "install: $(VENV) with the pinned dependencies"; \
	  $(PY) -m pip install -q --disable-pip-version-check -U pip setuptools wheel; \
	  $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -c requirements.lock -e '.[dev]'; \
	  touch $(STAMP); \
	fi

test: install ## run the fast test suite
	WANDB_MODE=disabled $(PY) -m pytest -q

test-all: install ## run every test, the slow ones too
	WANDB_MODE=disabled $(PY) -m pytest -q -m "slow or not slow"

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check lit_spine tests
	$(VENV)/bin/ruff format --check lit_spine tests

format: install ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix lit_spine tests
	$(VENV)/bin/ruff format lit_spine tests

sweep: install ## run the default ablation (SWEEP=sweeps/<file>.yaml WORKERS=N) and print the report
	$(LIT) sweep $(SWEEP) --workers $(WORKERS)

report: install ## render the report of the latest sweep
	$(LIT) report --latest

bench: install ## run the benchmarks and write BENCHMARKS.md
	$(LIT) bench --out BENCHMARKS.md

phantom: install ## generate the phantom dataset (PHANTOM_DIR, PHANTOM_STUDIES) with a preview PNG
	$(LIT) phantom --out $(PHANTOM_DIR) --studies $(PHANTOM_STUDIES) --preview

smoke: install ## train the smoke experiment on the phantom (about 2 minutes on a CPU)
	$(LIT) fit --config experiments/smoke.yaml

clean: ## remove caches and build leftovers (keeps .venv, data/, runs/ and sweep_runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
