# The one entry point for people, CI and the README.
#   make run    the whole gateway, demo account and demo upstream included
#   make test   the full test suite (starts its own PostgreSQL and Redis if needed)
#   make lint   ruff + mypy --strict
#   make bench  the benchmark suite: direct vs passthrough vs our proxy (~20 min with
#               the 10-minute soak; make bench BENCH_ARGS="--quick" for a 1-minute run)
# Each installs what it needs into .venv on first use; nothing else is assumed
# but Python 3.11+ with pip and venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    := $(VENV)/.installed-dev
TEST   := $(VENV)/.installed-test
BENCH  := $(VENV)/.installed-bench
BENCH_ARGS ?=

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(BENCH): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@ $(DEV)

$(TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(DEV) $(BENCH)

run: $(DEV)
	$(BIN)/python -m devstack.run

test: $(TEST)
	$(BIN)/python -m pytest

lint: $(TEST)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict proxy control_plane shared

bench: $(BENCH)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
