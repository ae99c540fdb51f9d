VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quick test test-fast lint

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(VENV)/.installed

## The quick study: the four MoE variants and the dense/plain references x 2 seeds on WikiText-2, into mlruns/
## (about 10 min on 2 CPU cores), then its report: reports/quick/report.md and report.pdf.
quick: $(VENV)/.installed
	$(BIN)/harness run-study studies/quick.yaml --report

## Every test, the slow end-to-end ones included (what CI runs).
test: $(VENV)/.installed
	$(BIN)/python -m pytest

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
