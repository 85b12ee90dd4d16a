# transvidio-cluster. `make up STACK=dev` deploys; `make test` proves it.
SHELL := /bin/bash
STACK ?= dev
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE_DIR := $(CURDIR)/.state
export PULUMI_BACKEND_URL ?= file://$(STATE_DIR)
SHELL_SCRIPTS := $(shell find images tests -name '*.sh' -not -path '*/.venv/*') .ci/run
DOCKERFILES := $(wildcard images/*/Dockerfile tests/e2e/*/Dockerfile tests/e2e/*/*/Dockerfile)

.PHONY: help venv stack up preview destroy render test lint unit e2e e2e-podman-dev e2e-swarm bench mutate mutate-resume clean

help:
	@echo "make up STACK=dev|prod   deploy with the Pulumi CLI (local state, passphrase secrets)"
	@echo "make preview STACK=...   show the plan"
	@echo "make destroy STACK=...   remove the stack's containers and networks (volumes are kept)"
	@echo "make render STACK=...    write every rendered config file to build/render/STACK"
	@echo "make test                static checks, unit tests, end-to-end tests (Docker, then the dev stack on Podman)"
	@echo "make e2e [ENGINE=podman]  end-to-end tests only, on Docker (default) or Podman"
	@echo "make e2e-swarm           the swarm suite, on a 3-node swarm made on this machine (root)"
	@echo "make bench               benchmark figures into bench/results.json and README (BENCH_MODULES=...)"
	@echo "make mutate              mutation testing of the fast tests (hours; not in CI)"
	@echo "make mutate-resume       go on with a stopped mutation run (same MUTATE_DIR)"

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
	$(BIN)/shellcheck --external-sources --source-path=SCRIPTDIR $(SHELL_SCRIPTS)

# The job queue's fast tests start a PostgreSQL server of their own (tests/pg_server.py),
# and the leader fence's run the image's script, which reads etcd's answers with jq: in CI,
# what is missing is installed from Debian (PostgreSQL without the cluster the package makes).
unit: venv
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="postgresql"; \
	command -v jq >/dev/null || missing="$$missing jq"; \
	[ -z "$$missing" ] || [ -z "$$CI" ] || { \
		mkdir -p /etc/postgresql-common && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }
	$(BIN)/python -m pytest -q tests --ignore=tests/e2e

# The end-to-end suite runs on Docker Engine (the engine of record) by default:
# `engine.sh` installs Debian's docker.io, starts a dockerd of its own (own data-root,
# exec-root, socket and pidfile under ENGINE_DIR), makes the base image locally, and
# stops the daemon by PID afterwards. ENGINE=podman runs it on Podman instead; with
# DOCKER_HOST set, that engine is used and nothing is started or stopped.
ENGINE ?= docker
ENGINE_DIR ?= /tmp/transvidio-engine
E2E_TESTS ?= tests/e2e
ENGINE_SH = ENGINE=$(ENGINE) ENGINE_DIR=$(ENGINE_DIR) DOCKER_HOST=$(DOCKER_HOST) bash tests/e2e/engine.sh

# Installs, starts and prepares the engine, runs CMD against it, stops it.
define with_engine
	@$(ENGINE_SH) install || [ -z "$$CI" ]
	@$(ENGINE_SH) start || [ -z "$$CI" ]
	@for base in $$($(BIN)/python -m tests.e2e.bases); do $(ENGINE_SH) base $$base || [ -z "$$CI" ] || exit 1; done
	E2E_ENGINE=$(ENGINE) DOCKER_HOST=$$($(ENGINE_SH) host) $(1); rc=$$?; $(ENGINE_SH) stop; exit $$rc
endef

e2e: venv
	$(call with_engine,$(BIN)/python -m pytest -q --durations=20 --ignore=tests/e2e/swarm $(E2E_TESTS))

# CI proves Podman too, with the dev stack's module (one engine at a time).
e2e-podman-dev: venv
	$(MAKE) e2e ENGINE=podman E2E_TESTS=tests/e2e/test_dev_stack.py

# The swarm suite: `swarm.sh` forms a swarm of SWARM_NODES dockerds (3), each in its own
# network namespace, with a registry on their bridge; the base images are made on the
# first node; everything is removed afterwards, whatever the outcome.
SWARM_SH = bash tests/e2e/swarm.sh
e2e-swarm: venv
	@$(SWARM_SH) install
	@$(SWARM_SH) up || { $(SWARM_SH) down; exit 1; }
	@eval "$$($(SWARM_SH) env)"; export SWARM_HOSTS SWARM_REGISTRY; \
	first=$${SWARM_HOSTS%% *}; \
	for base in $$($(BIN)/python -m tests.e2e.bases); do \
		DOCKER_HOST=$${first#*=} ENGINE_DIR=/tmp/transvidio-swarm/engine bash tests/e2e/engine.sh base $$base || exit 1; \
	done && $(BIN)/python -m pytest -q --durations=10 tests/e2e/swarm; rc=$$?; $(SWARM_SH) down; exit $$rc

test: lint unit e2e e2e-podman-dev e2e-swarm

# Benchmark figures (not tests): same engine preparation as e2e. Each benchmark replaces its
# own section of BENCH_JSON (every figure with its runs), then README's performance tables are
# made from that file. BENCH_MODULES runs some of them (about an hour for all, on 2 cores).
BENCH_MODULES ?= data_tier pipeline backups postgres_failover security
BENCH_JSON ?= bench/results.json
bench: venv
	$(call with_engine,bash -c 'for module in $(BENCH_MODULES); do BENCH_JSON=$(abspath $(BENCH_JSON)) $(BIN)/python -m bench.$$module || exit 1; done')
	$(BIN)/python -m bench.readme $(BENCH_JSON) README.md

# Mutation testing, not part of CI (about 3,600 mutants: hours on 2 cores): mutmut changes
# components/ and the Python in images/ one mutation at a time, in copies of the working tree
# (one per shard of MUTATE_SHARDS, run side by side, under MUTATE_DIR), and runs against each
# mutant the fast tests that import the mutated file, narrowed for a mutant inside a function to
# the tests that ran its statement in a first, measured run of the unmutated tests
# (tests/mutation_map.py writes that map, tests/mutation_runner.py picks the tests); then the
# score and every survivor are printed, each survivor with its reason from
# tests/mutation_survivors.txt or marked unexplained. MUTATE_SHARDS narrows it (space between
# shards, commas within one); MUTATE_TESTS picks the tests (an end-to-end module needs
# DOCKER_HOST pointing at a running engine with the images, and runs for every mutant). A run
# that was stopped goes on with `make mutate-resume` (same MUTATE_DIR). `python -m
# tests.mutation_score DIR/shard-*` shows a running one's progress; read a shard's .mutmut-cache
# in no other way while it runs (only with SQLite's immutable=1): a read lock makes mutmut 2.5
# fail a status write ("database is locked") and hang. Nor `mutmut show ID` in a running shard:
# it rereads the source, which holds the mutant under test at that moment, rewrites the
# shard's line table from it and drops that line's mutants, and mutmut then dies on the status
# write ("Mutant.line is required"); show a mutant once its shard is done.
comma := ,
empty :=
space := $(empty) $(empty)
# Four shards on 2 cores (996, 682, 346 and 1,626 mutants on 2026-12-07): settings.py (mostly a
# table run at import, so its mutants meet every test), the backend's Python, the job pipeline's,
# and the rest of components/. More shards than cores, so that no one shard is left running
# alone on one core while the other core idles.
MUTATE_SHARDS ?= components/settings.py images/backend/app/ images/common/transvidio_jobs/ \
	$(subst $(space),$(comma),$(filter-out components/settings.py,$(wildcard components/*.py)))
MUTATE_DIR ?= build/mutate
# Seconds after which a mutant's test run counts as killed (it waits forever): empty for the
# runner's own RUN_LIMIT_SECONDS; an end-to-end module in MUTATE_TESTS needs more.
MUTATE_RUN_LIMIT ?=
MUTATE_TESTS ?= tests/test_settings.py tests/test_render.py tests/test_provider_model.py \
	tests/test_backend_routing.py tests/test_backend_api.py tests/test_backend_cache.py tests/test_backend_db.py tests/test_jobs.py tests/test_worker.py tests/test_queue.py \
	tests/test_program.py tests/test_swarm.py
mutate: venv
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)/pristine
	git ls-files | tar -T - -c | tar -C $(MUTATE_DIR)/pristine -x
	cd $(MUTATE_DIR)/pristine && $(CURDIR)/$(BIN)/python -m tests.mutation_map $(abspath $(MUTATE_DIR))/coverage.json $(MUTATE_TESTS)
	@shard=0; for paths in $(MUTATE_SHARDS); do \
		shard=$$((shard + 1)); dir=$(MUTATE_DIR)/shard-$$shard; \
		cp -a $(MUTATE_DIR)/pristine $$dir && ln -s $(CURDIR)/$(VENV) $$dir/$(VENV) && echo "$$paths" > $$dir/.mutate-paths; \
	done
	$(MAKE) --no-print-directory mutate-resume

# Runs (again) every shard of MUTATE_DIR, on the tree it was made from: mutmut keeps each
# mutant's status in the shard and tests only those not yet tested, so a run that was stopped
# goes on where it stopped.
mutate-resume: venv
	@for dir in $(MUTATE_DIR)/shard-*; do \
		paths=$$(cat $$dir/.mutate-paths); echo "$$dir: $$paths (log: $$dir/mutmut.log)"; \
		( cd $$dir && $(BIN)/mutmut run --paths-to-mutate $$paths --tests-dir tests --no-progress \
			--runner "$(BIN)/python -m tests.mutation_runner --pristine $(abspath $(MUTATE_DIR))/pristine \
				--coverage $(abspath $(MUTATE_DIR))/coverage.json $(if $(MUTATE_RUN_LIMIT),--limit $(MUTATE_RUN_LIMIT)) -x -q -p no:cacheprovider $(MUTATE_TESTS)" >> mutmut.log 2>&1 ) & \
	done; wait
	$(BIN)/python -m tests.mutation_score $(MUTATE_DIR)/shard-*

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
