# Two commands on a fresh machine: `make demo` and `make test`. Everything they need is
# installed by the targets below (a venv from PyPI, buf from npm).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: help setup system-packages demo test test-fast bench soak proto docs lint lint-proto postgres clean

help:
	@echo "make demo        JupyterHub on http://127.0.0.1:8000 spawning through an Outpost (gRPC 50051, SSH 2222)"
	@echo "make test        set up everything and run the whole test suite"
	@echo "make test-fast   the unit and RPC tests only (no sshd, hubs or Slurm; 2 to 3 minutes)"
	@echo "make bench       benchmarks against a real Outpost (table + bench-results/bench.json)"
	@echo "make soak        10 minutes of start/poll/stop with real processes (bench-results/soak.json)"
	@echo "make proto       regenerate outpost_client/v1 from protos/"
	@echo "make docs        regenerate docs/config-reference.md from the options' help texts"
	@echo "make lint-proto  buf lint"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

system-packages:
	bash scripts/ensure-system-packages.sh

setup: $(VENV)/.installed node_modules/.installed system-packages

proto: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

docs: $(VENV)/.installed
	$(PY) scripts/gen_config_docs.py

lint-proto: node_modules/.installed
	$(BUF) lint

lint: setup
	$(VENV)/bin/ruff check .
	$(BUF) lint
	$(VENV)/bin/hadolint Dockerfile

# PostgreSQL runs on this machine kind already; start it if it was stopped.
postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || \
	  { command -v pg_ctlcluster >/dev/null && \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -1) main start; } || \
	  echo "warning: no PostgreSQL on 127.0.0.1:5432; the PostgreSQL tests will fail"

test: setup postgres
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# the unit and rpc layers (tests/conftest.py) without the slow ones: no sshd, hub, Slurm,
# network namespace or PostgreSQL server, so no system packages either (2 to 3 minutes)
test-fast: $(VENV)/.installed node_modules/.installed
	$(PY) -m pytest -m "(unit or rpc) and not slow and not postgres and not slurm" $(PYTEST_ARGS)

$(VENV)/.demo-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $@

demo: setup $(VENV)/.demo-installed
	@bash demo/run.sh

# n=100 and n=2000 (keys with _n2000, and their ratios), event latency, CPU of 2,000 servers;
# spawn_bench runs jupyterhub-singleuser with JupyterLab, as the demo does (the demo extra);
# burst_bench: 40 users logging in at once, 3 bursts per hub (about 10 minutes)
bench: setup $(VENV)/.demo-installed
	$(PY) benchmarks/bench.py --n 100 2000 --json bench-results/bench.json
	$(PY) benchmarks/tunnel_bench.py --json bench-results/tunnel.json
	$(PY) benchmarks/spawn_bench.py --json bench-results/spawn.json
	$(PY) benchmarks/burst_bench.py --json bench-results/burst.json

# not part of `make test`: 10 minutes (SOAK_ARGS="--minutes 2" for a shorter run)
soak: setup
	$(PY) benchmarks/soak.py --json bench-results/soak.json $(SOAK_ARGS)

clean:
	rm -rf $(VENV) node_modules demo-data bench-results .pytest_cache
