# Two commands for a new user: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PRESET ?= tiny
DEMO_EPOCHS ?= 5
DEMO_DIR ?= runs/demo

.PHONY: setup up down status demo demo-cli lint test bench study study-quick clean help

help:
	@echo "make demo      - start the stack, run a pipeline job on the bundled sample, print the dashboard URL"
	@echo "make demo-cli  - the three ORL stages through the CLI only (no services)"
	@echo "make up/down   - single-machine mode: start/stop API, workers, trainer, dashboard (data kept)"
	@echo "make status    - what is running"
	@echo "make lint      - ruff over the whole tree, mypy over orl/ (settings in pyproject.toml)"
	@echo "make test      - the linters, then the test suite"
	@echo "make bench     - mining benchmark on ../shared/data/coco128 (writes benchmarks/results/)"
	@echo "make study     - evidence study, long run (one seed, 3,000 stage-1 steps; hours on 2 CPU cores; resumable)"
	@echo "make study-quick - the study's pipeline check (minutes; numbers mean nothing)"
	@echo "make clean     - stop everything, remove .state/, runs/ and the virtualenv"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

up: setup
	$(BIN)/python scripts/stack.py up

down:
	$(PY) scripts/stack.py down

status: setup
	$(BIN)/python scripts/stack.py status

demo: setup
	$(BIN)/python scripts/demo_stack.py --preset $(PRESET) --epochs $(DEMO_EPOCHS)

demo-cli: setup
	PRESET=$(PRESET) EPOCHS=$(DEMO_EPOCHS) OUT=$(DEMO_DIR) ORL=$(BIN)/orl bash scripts/demo.sh

# The linters run first; if either fails, make stops and pytest does not run.
lint: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/mining_benchmark.py

study: setup
	$(BIN)/python -m benchmarks.study --mode long

study-quick: setup
	$(BIN)/python -m benchmarks.study --quick

clean:
	$(PY) scripts/stack.py clean
	rm -rf runs $(VENV) .pytest_cache .hypothesis
