# Set-up, tests and the main jobs. Override TORCH_SPEC for a CUDA build, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install data train demo serve multi30k bench bench-data test test-fast check format clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,bench,export,serve]"

data:
	$(BIN)/mt data fetch multi30k data/multi30k --langs de,en

train:
	$(BIN)/mt train --config configs/multi30k.yaml

demo:
	MT=$(BIN)/mt bash scripts/demo.sh

# The demo model behind HTTP, with a page to try it: http://127.0.0.1:8000/ (MODEL=RUN for another)
MODEL ?= runs/demo
serve:
	$(BIN)/mt serve $(MODEL)

# Both Multi30k directions end to end, 58 minutes of training each (docs/benchmarks.md)
multi30k:
	MT=$(BIN)/mt bash scripts/multi30k.sh

# mt against Hugging Face MarianMTModel on Multi30k (~15 min on 2 cores); writes docs/benchmarks.md
bench:
	$(BIN)/python scripts/bench.py --write docs/benchmarks.md

# mt's data pipeline on a synthetic 0.5M-5M-pair corpus (~12 min on 2 cores, ~7 GB of disk in
# a temporary directory); writes docs/benchmarks.md
bench-data:
	$(BIN)/python scripts/bench_data.py --write docs/benchmarks.md

# One test process per core (at most 4): most tests run one thread or start their own processes.
# loadgroup: the tests of one xdist_group run on one worker, sharing its module fixtures.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadgroup

test:
	$(BIN)/pytest $(PYTEST_WORKERS)

# The suite without its long end-to-end runs (marked slow), for a quick check while editing
test-fast:
	$(BIN)/pytest $(PYTEST_WORKERS) -m "not slow"

check:
	$(BIN)/ruff check mt tests scripts
	$(BIN)/ruff format --check mt tests scripts

format:
	$(BIN)/ruff check --fix mt tests scripts
	$(BIN)/ruff format mt tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
