# transvidio-cluster. `make up STACK=dev` deploys; `make test` proves it.
SHELL := /bin/bash
STACK ?= dev
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE_DIR := $(CURDIR)/.state
export PULUMI_BACKEND_URL ?= file://$(STATE_DIR)
SHELL_SCRIPTS := $(shell find images tests -name '*.sh' -not -path '*/.venv/*') .ci/run
DOCKERFILES := $(wildcard images/*/Dockerfile)

.PHONY: help venv stack up preview destroy render test lint unit e2e bench clean

help:
	@echo "make up STACK=dev|prod   deploy with the Pulumi CLI (local state, passphrase secrets)"
	@echo "make preview STACK=...   show the plan"
	@echo "make destroy STACK=...   remove the stack's containers and networks (volumes are kept)"
	@echo "make render STACK=...    write every rendered config file to build/render/STACK"
	@echo "make test                static checks, unit tests, end-to-end tests"
	@echo "make bench               benchmark figures (BENCH_JSON=path writes them as JSON)"

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

venv: $(BIN)/.installed

$(STATE_DIR):
	mkdir -p $@

stack: venv $(STATE_DIR)
	@command -v pulumi >/dev/null || { echo "the Pulumi CLI is needed: https://www.pulumi.com/docs/install/"; exit 1; }
	pulumi stack select --create $(STACK) --secrets-provider passphrase

up: stack
	pulumi up --stack $(STACK)

preview: stack
	pulumi preview --stack $(STACK) --diff

destroy: stack
	pulumi destroy --stack $(STACK)

render: venv
	$(BIN)/python -m components.render --stack $(STACK) --out build/render/$(STACK)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint $(DOCKERFILES)
	$(BIN)/shellcheck $(SHELL_SCRIPTS)

unit: venv
	$(BIN)/python -m pytest -q tests --ignore=tests/e2e

ENGINE_DIR ?= /tmp/transvidio-engine
E2E_DOCKER_HOST = $(if $(DOCKER_HOST),$(DOCKER_HOST),unix://$(ENGINE_DIR)/podman.sock)

# The end-to-end suite: installs and starts Podman (unless DOCKER_HOST names an engine),
# makes the base image locally, applies both stacks for real, stops the service.
e2e: venv
	@bash tests/e2e/engine.sh install || [ -z "$$CI" ]
	@for base in $$($(BIN)/python -m tests.e2e.bases); do \
		DOCKER_HOST=$(DOCKER_HOST) ENGINE_DIR=$(ENGINE_DIR) bash tests/e2e/engine.sh base $$base || [ -z "$$CI" ] || exit 1; done
	@DOCKER_HOST=$(DOCKER_HOST) ENGINE_DIR=$(ENGINE_DIR) bash tests/e2e/engine.sh start || [ -z "$$CI" ]
	DOCKER_HOST=$(E2E_DOCKER_HOST) $(BIN)/python -m pytest -q tests/e2e; rc=$$?; \
		DOCKER_HOST=$(DOCKER_HOST) ENGINE_DIR=$(ENGINE_DIR) bash tests/e2e/engine.sh stop; exit $$rc

test: lint unit e2e

# Benchmark figures (not tests): same engine preparation as e2e.
bench: venv
	@bash tests/e2e/engine.sh install
	@for base in $$($(BIN)/python -m tests.e2e.bases); do \
		DOCKER_HOST=$(DOCKER_HOST) ENGINE_DIR=$(ENGINE_DIR) bash tests/e2e/engine.sh base $$base || exit 1; done
	@DOCKER_HOST=$(DOCKER_HOST) ENGINE_DIR=$(ENGINE_DIR) bash tests/e2e/engine.sh start
	DOCKER_HOST=$(E2E_DOCKER_HOST) $(BIN)/python -m bench.data_tier && \
		DOCKER_HOST=$(E2E_DOCKER_HOST) $(BIN)/python -m bench.pipeline; rc=$$?; \
		DOCKER_HOST=$(DOCKER_HOST) ENGINE_DIR=$(ENGINE_DIR) bash tests/e2e/engine.sh stop; exit $$rc

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
