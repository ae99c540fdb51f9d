VENV ?= .venv
BIN := $(VENV)/bin
RELIABILITY_SEED ?= 0
RELIABILITY_SLICE ?= 1

.PHONY: setup quick results test test-fast reliability lint

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(VENV)/.installed

## The quick study: the four MoE variants and the dense/plain references x 2 seeds on WikiText-2, into mlruns/
## (two cells at a time on a local Ray cluster, which run-study chooses for it: about 10 min on 2 CPU cores), then its report:
## reports/quick/report.md and report.pdf.
quick: $(VENV)/.installed
	$(BIN)/harness run-study studies/quick.yaml --report

## Check every committed result (docs/results/<study>/): one commit, two cells rerun alone (exact where commit and
## device match), then the whole study rerun into a fresh store; fails when a decision changed (about 2.5 h on 2 CPU
## cores). RESULTS="claim --sample-only" skips the full rerun; RESULTS="claim --update" commits a new report.
results: $(VENV)/.installed
	$(BIN)/python scripts/check_results.py $(RESULTS)

## Every test, the slow end-to-end ones included, and RELIABILITY_SLICE reliability cases per part drawn with
## RELIABILITY_SEED, in one pytest run (what CI runs; its fixtures built once); the 15 slowest tests listed at its end.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "slow or not slow" --reliability-seed $(RELIABILITY_SEED) \
		--reliability-slice $(RELIABILITY_SLICE) --durations=15

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest

## Every reliability case (tests/reliability): the command line as subprocesses fed bad input, killed, signalled,
## started together and hit by faults of the machine; a table per part at the end. RELIABILITY_SEED=N: other moments.
reliability: $(VENV)/.installed
	$(BIN)/python -m pytest -m reliability --reliability-seed $(RELIABILITY_SEED) tests/reliability

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
