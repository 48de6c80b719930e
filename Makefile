# Every target sets up what it needs on a fresh machine: the virtualenv, the packages, the assets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on this kind of machine; a GPU host sets TORCH='torch' (or its own pin).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# make keeps the assets beside the checkout (the `fedbpt` command alone defaults to the user cache directory).
export FEDBPT_CACHE_DIR ?= $(CURDIR)/.cache/fedbpt
ASSETS := $(FEDBPT_CACHE_DIR)/.fetched

.PHONY: setup assets demo test test-shuffled test-slow test-fuzz test-flower compose-test bench bench-flower clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[service,client,aggregator,dev,flower-sim]'
	touch $(STAMP)

setup: $(STAMP)

$(ASSETS): $(STAMP)
	$(PY) -m fedbpt.cli assets fetch
	touch $(ASSETS)

assets: $(ASSETS)

demo: $(ASSETS)
	$(PY) -m fedbpt.cli demo

# File order, as CI runs it; `make test-shuffled` runs the same suite in a random order (its seed is printed).
test: $(ASSETS)
	$(PY) -m pytest -q -p no:randomly

test-shuffled: $(ASSETS)
	$(PY) -m pytest -q

test-slow: $(ASSETS)
	$(PY) -m pytest -q -m slow

# FedBPT on Flower (docs/flower.md): the simulation engine (also in `make test`) and the deployment engine on
# loopback (SuperLink with TLS and SuperNode auth, three SuperNodes), checked against the native aggregator.
test-flower: $(ASSETS)
	$(PY) -m pytest -q -s -p no:randomly -m 'slow or not slow' tests/test_flower.py

# The container stack for real (tests/test_compose_stack.py, docs/docker.md): builds the images with the
# local Docker engine, runs the cpu profile, checks the report and a resume, then `down -v`. Needs Compose v2.
compose-test: $(STAMP)
	$(PY) -m pytest -q -s -m docker tests/test_compose_stack.py

# The fuzz tests searching twenty times as far as in `make test`.
test-fuzz: $(ASSETS)
	$(PY) -m pytest -q -m fuzz --hypothesis-profile=fedbpt-long

bench: $(ASSETS)
	$(PY) bench/service_overhead.py

# Native aggregator vs Flower deployment, side by side on one service: link bytes per client-round, time per round.
bench-flower: $(ASSETS)
	$(PY) bench/flower_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
