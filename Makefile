# Every target bootstraps .venv itself: on a fresh machine with Python 3.11,
# `make demo` and `make test` are the only two commands needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration e2e chaos bench up contracts conformance clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/toolbus demo

up: $(STAMP)
	$(BIN)/toolbus up --config toolbus.yaml

test: $(STAMP) lint typecheck
	$(BIN)/python -m shared.contracts.generate --check
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check shared services tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy

unit integration e2e chaos: $(STAMP)
	$(BIN)/python -m pytest -m $@

contracts: $(STAMP)
	$(BIN)/python -m shared.contracts.generate

bench: $(STAMP)
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.whole_path
	$(BIN)/python -m bench.pools
	$(BIN)/python -m bench.budget
	$(BIN)/python -m bench.audit
	$(BIN)/python -m bench.context
	$(BIN)/python -m bench.gateway

# The MCP conformance suite through the gateway and against its backend directly, compared;
# setup.sh installs Node 22 and the suite under .tools/ (once). Results: bench/results/conformance.json.
conformance: $(STAMP)
	bash scripts/conformance/setup.sh
	$(BIN)/python scripts/conformance/gateway.py

clean:
	rm -rf $(VENV) .toolbus .mypy_cache .ruff_cache
