# Two commands for a new user: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PRESET ?= tiny
DEMO_EPOCHS ?= 5
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench clean help

help:
	@echo "make demo   - set up (first use) and run the three ORL stages on the bundled sample"
	@echo "make test   - set up (first use) and run the test suite"
	@echo "make bench  - mining benchmark on ../shared/data/coco128 (writes benchmarks/results/)"
	@echo "make clean  - remove runs/ and the virtualenv"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	PRESET=$(PRESET) EPOCHS=$(DEMO_EPOCHS) OUT=$(DEMO_DIR) ORL=$(BIN)/orl bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/mining_benchmark.py

clean:
	rm -rf runs $(VENV) .pytest_cache .hypothesis
