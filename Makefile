# ferry: `make serve` and `make test` are the two set-up commands; everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL_DIR ?= models/opt-125m
TINY_MODEL_DIR ?= models/tiny
HTTP_PORT ?= 8080
GRPC_PORT ?= 8081
# Debian packages the tests need: Prometheus (+ promtool) for the observability tests,
# wrk as a cheap load generator for the benchmark.
APT_PACKAGES := prometheus wrk

-include mk/*.mk

.PHONY: help serve test lint typecheck models bench bench-quick reliability soak clean system-deps

help:
	@echo "make serve        venv + install + build the offline OPT-125m-shaped model + serve on :$(HTTP_PORT)"
	@echo "make test         install test deps (Debian + PyPI) and run the whole test suite"
	@echo "make lint         ruff + mypy"
	@echo "make bench-quick  side-by-side benchmark, quick mode (~4 min)"
	@echo "make bench        full benchmark + concurrency sweep + plots"

$(VENV)/.stamp-runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# `convert` (torch + transformers) too: tests/test_convert.py checks converted weights against
# transformers' own generate.
$(VENV)/.stamp-dev: $(VENV)/.stamp-runtime pyproject.toml
	$(PIP) install -q -e '.[dev,loadtest,convert]'
	touch $@

$(MODEL_DIR)/model.bin: | $(VENV)/.stamp-runtime
	$(PY) -m predictor.build_model random $(MODEL_DIR)

$(TINY_MODEL_DIR)/model.bin: | $(VENV)/.stamp-runtime
	$(PY) -m predictor.build_model tiny $(TINY_MODEL_DIR)

models: $(MODEL_DIR)/model.bin $(TINY_MODEL_DIR)/model.bin

serve: $(VENV)/.stamp-runtime $(MODEL_DIR)/model.bin
	$(PY) -m predictor --model-dir $(MODEL_DIR) --http_port $(HTTP_PORT) --grpc_port $(GRPC_PORT)

system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: system-deps $(VENV)/.stamp-dev models
	$(PY) -m pytest -q

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check predictor loadtest tests tools deploy
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) models bench-results .pytest_cache .mypy_cache
