# One command each: `make serve` starts the server, `make test` runs the tests.
# Both create .venv at the repository root when missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
# The one install recipe, shared with docker/Dockerfile (tests/test_docker.py compares them).
# The cvxpy extra too, so `make serve` serves every documented method (nash_mtl and cagrad need it).
SERVE_REQS := -e ./client -e './service[cvxpy]'
TEST_REQS := -e './client[torch,progress]' -e './service[test]'
# Tested against, never depended on: its gradient_weighting module needs only pydantic and torch, and
# --no-deps skips what the package declares (diffusers, jax, ...). Pinned in constraints.txt.
NODEPS_TEST_REQS := vision-unlearning
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.serve: $(BIN)/python constraints.txt client/pyproject.toml service/pyproject.toml
	@echo "Installing gradweight, gradweight-server[cvxpy] and torch (pinned by constraints.txt) into $(VENV)"
	@echo "(the first time takes a minute or more: torch alone is a large download) ..."
	$(PIP) $(SERVE_REQS)
	@echo "Installed; the server and the CLI are $(BIN)/gradweight-server and $(BIN)/gradweight."
	touch $@

$(VENV)/.test: $(VENV)/.serve
	@echo "Installing the test tools and vision-unlearning (without its dependencies) into $(VENV) ..."
	$(PIP) $(TEST_REQS)
	$(PIP) --no-deps $(NODEPS_TEST_REQS)
	@# nginx for tests/scaleout/test_nginx.py: Debian's package where we may install it (CI runs as root)
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; \
	  else echo "nginx missing (needs root and apt-get): tests/scaleout/test_nginx.py will skip"; fi; fi
	touch $@

serve: $(VENV)/.serve
	$(BIN)/gradweight-server --host $(HOST) --port $(PORT)

test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: test lint

bench: $(VENV)/.test
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
