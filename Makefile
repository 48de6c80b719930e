# Every target sets up what it needs on a fresh machine: the virtualenv, the packages, the assets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on this kind of machine; a GPU host sets TORCH='torch' (or its own pin).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
FLOWER_VENV ?= .venv-flower
FLOWER_PY := $(FLOWER_VENV)/bin/python
FLOWER_STAMP := $(FLOWER_VENV)/.installed
COMPOSE_VENV ?= .venv-compose
COMPOSE_PY := $(COMPOSE_VENV)/bin/python
COMPOSE_STAMP := $(COMPOSE_VENV)/.installed
# make keeps the assets beside the checkout (the `fedbpt` command alone defaults to the user cache directory).
export FEDBPT_CACHE_DIR ?= $(CURDIR)/.cache/fedbpt
ASSETS := $(FEDBPT_CACHE_DIR)/.fetched

.PHONY: setup assets demo lint test test-shuffled test-slow test-fuzz test-flower compose-venv compose-test bench bench-flower clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[service,client,aggregator,dev]'
	touch $(STAMP)

setup: $(STAMP)

$(ASSETS): $(STAMP)
	$(PY) -m fedbpt.cli assets fetch
	touch $(ASSETS)

assets: $(ASSETS)

demo: $(ASSETS)
	$(PY) -m fedbpt.cli demo

# Lint (ruff), format (ruff format) and types (mypy, config in pyproject.toml); part of `make test`.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# File order, as CI runs it; `make test-shuffled` runs the same suite in a random order, printing its seed
# first (-q hides pytest-randomly's own header); `make test-shuffled SEED=N` replays an order.
test: lint $(ASSETS)
	$(PY) -m pytest -q -p no:randomly

test-shuffled: $(ASSETS)
	@seed=$${SEED:-$$(date +%s)}; echo "test order seed $$seed (replay: make test-shuffled SEED=$$seed)"; \
	$(PY) -m pytest -q --randomly-seed=$$seed

test-slow: $(ASSETS)
	$(PY) -m pytest -q -m slow

# FedBPT on Flower (docs/flower.md) in its own virtualenv: flwr 1.42 pins fastapi, starlette and uvicorn below
# what the service runs elsewhere, and its simulation engine brings Ray. The simulation run and the deployment
# engine on loopback (SuperLink with TLS and SuperNode auth, three SuperNodes) against the native aggregator.
$(FLOWER_STAMP): pyproject.toml Makefile
	test -x $(FLOWER_PY) || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(FLOWER_PY) -m pip install -q --disable-pip-version-check -e '.[service,client,aggregator,dev,flower-sim]'
	touch $(FLOWER_STAMP)

test-flower: $(FLOWER_STAMP) $(ASSETS)
	$(FLOWER_PY) -m pytest -q -s -p no:randomly -m 'slow or not slow' tests/system/test_flower.py

# Native aggregator vs Flower deployment, side by side on one service: link bytes per client-round, time per round.
bench-flower: $(FLOWER_STAMP) $(ASSETS)
	$(FLOWER_PY) -m bench.flower_overhead

# The container stack for real (tests/system/test_compose_stack.py, docs/docker.md): builds the images with the
# local Docker engine, runs the cpu profile, checks the report and a resume, then `down -v`. Needs Compose v2.
# The stack runs in the images: the host only drives Docker, from a light virtualenv of its own (no torch; a
# test keeps the stack test's imports within it).
$(COMPOSE_STAMP): Makefile
	test -x $(COMPOSE_PY) || $(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_PY) -m pip install -q --disable-pip-version-check 'pytest>=8' 'pytest-timeout>=2.3' 'hypothesis>=6.100' 'httpx>=0.27'
	touch $(COMPOSE_STAMP)

compose-venv: $(COMPOSE_STAMP)

compose-test: $(COMPOSE_STAMP)
	$(COMPOSE_PY) -m pytest -q -s -m docker tests/system/test_compose_stack.py

# The fuzz tests searching twenty times as far as in `make test`.
test-fuzz: $(ASSETS)
	$(PY) -m pytest -q -m fuzz --hypothesis-profile=fedbpt-long

bench: $(ASSETS)
	$(PY) -m bench.service_overhead

clean:
	rm -rf $(VENV) $(FLOWER_VENV) $(COMPOSE_VENV) runs .pytest_cache
