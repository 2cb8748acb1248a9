# Two commands set up and exercise everything on a fresh machine:
#   make demo   -- create .venv, install, run the main job on the embedded default
#   make test   -- create .venv, install, run the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned: its CPU build lies on local disk and installs offline; a looser spec
# would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-all lint format bench bench-gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m zoopt.cli demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=1800

# Quick versions of every benchmark (each prints JSON; a few minutes on 2 idle cores).
# Paper-scale commands and recorded numbers: docs/engine.md, docs/scaling.md, docs/performance.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/estimator_overhead.py --json
	$(BIN)/python benchmarks/cge_throughput.py --model resnet20 --batch 32 --sparsity 0.9 \
		--coords 600 --budget-s 10 --rounds 2 --threads 1 --json
	$(BIN)/python benchmarks/forward_parallel.py --workers 1 2 --sparsity 0.99 --json
	$(BIN)/python benchmarks/classifier_api.py --json
	$(BIN)/python benchmarks/wake_flow.py --resolutions 16x32 --batches 1 32 --steps 20
	$(BIN)/python benchmarks/model_zoo.py --budget-s 2 --rounds 1 --truth-coords 16 --json
	$(BIN)/python benchmarks/large_model.py --quick

# The GPU suite (benchmarks/gpu_suite.py): needs CUDA, no set-up of its own (it runs with
# the interpreter given as BENCH_PY, e.g. on a GPU machine whose python3 already has torch).
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
bench-gpu:
	$(BENCH_PY) benchmarks/gpu_suite.py --out $${OUT:-.}/gpu_suite.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
