# The one entry point for people, CI and the README.
#   make run    the whole gateway, demo account and demo upstream included
#   make test   the full test suite (starts its own PostgreSQL and Redis if needed)
#   make lint   ruff + mypy --strict
#   make bench  the spine benchmark (proxy vs. calling the upstream directly)
# Each installs what it needs into .venv on first use; nothing else is assumed
# but Python 3.11+ with pip and venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    := $(VENV)/.installed-dev
TEST   := $(VENV)/.installed-test
BENCH  := $(VENV)/.installed-bench

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
	$(BIN)/python -m benchmarks.spine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
