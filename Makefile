# resnet-serving: every target is idempotent and sets up what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= model_repository
HOST ?= 127.0.0.1
PORT ?= 8000
# The tritonserver binary (CPU, python backend) ships inside this wheel. Installed
# without its dependencies: we need only the binary, not pytriton's Python API.
PYTRITON := nvidia-pytriton==0.7.0

.PHONY: help setup tools browser serve demo test test-fast image lint bench fuzz docs proto clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[export,service,openvino,triton,bench,deploy,docs,dev]"
	$(BIN)/pip install --quiet --no-deps "$(PYTRITON)"
	@touch $@

setup: $(STAMP) ## create .venv and install everything (torch CPU, ONNX Runtime, tritonserver)

# promtool (checks and unit-tests the alert rules) ships only in Debian's prometheus
# package: take that one binary out of the .deb, no service installed or started.
# A promtool already on PATH is used instead.
PROMTOOL := $(BIN)/promtool
$(PROMTOOL): | $(STAMP)
	@if command -v promtool >/dev/null; then ln -sf "$$(command -v promtool)" $@; else \
		command -v apt-get >/dev/null || { echo "promtool: needs apt-get (Debian) or promtool on PATH" >&2; exit 1; }; \
		tmp=$$(mktemp -d) && cd $$tmp \
		&& { apt-get download -q prometheus 2>/dev/null || { apt-get update -q >/dev/null && apt-get download -q prometheus; }; } \
		&& dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool \
		&& mv usr/bin/promtool $(CURDIR)/$@ && cd / && rm -rf $$tmp; \
	fi
	@$@ --version | head -1

# Chromium and its WebDriver for the browser tests (tests/e2e/test_pages.py): Debian's, one
# source package, so their versions always match (Playwright's and Selenium's own browser
# downloads need the internet). Installed where either is missing.
browser: ## Chromium and chromedriver (Debian's) for the browser tests
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		command -v apt-get >/dev/null || { echo "browser: needs apt-get (Debian) or chromium and chromedriver on PATH" >&2; exit 1; }; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
			|| { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	fi
	@chromedriver --version | head -1

tools: $(STAMP) $(PROMTOOL) browser ## the checkers: Helm engine, k8s schemas, hadolint, promtool, podman, Chromium
	@ENGINE=podman bash deploy/image.sh engine  # the suite runs the image and pods with podman

TARGET ?= cpu
# Non-empty: the image with the OpenVINO engine too (the Dockerfile's OPENVINO build argument).
OPENVINO ?=
image: ## build the gateway image (TARGET=cpu or gpu; OPENVINO=1 adds OpenVINO) with podman or docker
	TARGET=$(TARGET) OPENVINO=$(OPENVINO) bash deploy/image.sh build

demo: setup ## train the digits demo model into $(REPO)/ unless it already holds a model
	@if $(BIN)/resnet-export validate --repository $(REPO) --quiet 2>/dev/null; then \
		echo "$(REPO)/ already holds a valid model; not retraining"; \
	else \
		$(BIN)/resnet-export demo --repository $(REPO); \
	fi

serve: demo ## set up, build the demo model if needed, serve it with the embedded backend
	@echo "Try it in a browser: http://$(HOST):$(PORT)/  (API docs: http://$(HOST):$(PORT)/docs)"
	$(BIN)/resnet-serve serve --repository $(REPO) --host $(HOST) --port $(PORT)

test: setup tools ## set up and run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: setup ## unit tests only: no sockets, no subprocesses (the inner loop)
	$(BIN)/python -m pytest -q tests/unit -m "not (slow or triton or external)"

lint: setup ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup ## measure the gateway against bare ONNX Runtime (see README)
	$(BIN)/python -m deploy.benchmarks

fuzz: setup ## fuzz the image path for longer than make test does (minutes)
	FUZZ_EXAMPLES=20000 FUZZ_RUNS=200000 $(BIN)/python -m pytest -q -m fuzz

docs: setup ## regenerate the settings table (docs/operations.md) and build the site into site/
	$(BIN)/python -m deploy.settings_doc
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

proto: setup ## regenerate service/transports/grpc/classifier_pb2*.py from classifier.proto
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		service/transports/grpc/classifier.proto

clean: ## remove the virtualenv and caches (keeps model_repository/)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
