# ecoworker — every task a developer or CI runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY      := .venv/bin/python
UV      := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
STACK   := deploy/dev/services.sh
PYTEST_ARGS ?=

.PHONY: help system-deps install services-up services-down test test-fast lint demo demo-down bench bench-journal bench-sink chaos

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

system-deps: ## Debian packages the stack and the tests need (as root; skipped when present)
	@bash deploy/dev/system-deps.sh

install: system-deps ## Python deps from uv.lock into .venv (dev extras included)
	@command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --break-system-packages uv
	$(UV) sync --frozen --extra dev

services-up: ## start RabbitMQ, PostgreSQL and S3 (moto) on private loopback ports
	bash $(STACK) up

services-down: ## stop what services-up started
	bash $(STACK) down

# A test that fails and then passes on its one rerun shows as R in the summary ("rerun" count; -rR names it at the end):
# on this shared 2-core machine that is timing noise far more often than a bug, but look at it.
RERUNS ?= --reruns 1 --reruns-delay 2 -rR

test: install services-up ## the whole test suite against the local stack (what CI runs)
	$(PY) -m pytest $(RERUNS) $(PYTEST_ARGS)

test-fast: install services-up ## the suite without the slow end-to-end and chaos tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff + mypy
	.venv/bin/ruff check ecoworker handlers tests bench deploy
	.venv/bin/mypy ecoworker handlers

demo: install services-up ## the main job: local stack + workers + sample tasks + summary from PostgreSQL
	$(PY) -m deploy.demo

demo-down: ## stop the demo workers and the stack
	-$(PY) -m deploy.demo --down
	bash $(STACK) down

bench: install services-up ## throughput and latency benchmarks, printed and written to bench/results/
	$(PY) -m bench.run --full --scale-repeats 3

bench-journal: install ## journal group commit vs one commit per task
	$(PY) -m bench.bench_journal

bench-sink: install services-up ## sink drain of a 100,000-row backlog vs one INSERT per row
	$(PY) -m bench.bench_sink

chaos: install services-up ## kill -9, broker restart, PostgreSQL outage, poison: nothing lost
	$(PY) -m pytest tests/test_chaos.py -m chaos -s $(PYTEST_ARGS)
