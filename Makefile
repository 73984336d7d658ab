# The two set-up commands from the README. Each creates .venv if needed and installs into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast quality style lint typecheck install gpu-check fashion-mnist

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST is the embedded default; Debian packages it (no download needed).
fashion-mnist:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist); \
	  else echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist' or put the four .gz files in data/fashion-mnist"; fi; \
	fi

quickstart: $(STAMP) fashion-mnist
	$(BIN)/edgeexit quickstart --force

test: $(STAMP) fashion-mnist
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The developer loop, cheapest first: quality (under a second), typecheck (about 35 s cold, a second
# cached), test-fast (about 2 minutes on a 2-core machine: neither the end-to-end `slow` tests nor the
# simulated-GPU `sim` tests), then test (everything, about 22 minutes there).
quality: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites files: ruff's fixes and formatting.
style: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lint: quality

# mypy, configured in pyproject.toml ([tool.mypy]): check_untyped_defs on the whole package; the
# modules not yet clean are listed there, so the list only shrinks.
typecheck: $(STAMP)
	$(BIN)/python -m mypy

test-fast: $(STAMP) fashion-mnist
	$(BIN)/python -m pytest -q -m "not slow and not sim" --durations=20

# On a CUDA machine: torch CUDA (eager + graphs) parity, latency, GPU training throughput, TensorRT
# and onnxruntime-cuda when present, into gpu-check.json. Elsewhere: one line, exit 0.
gpu-check:
	@if [ -x $(BIN)/python ]; then $(BIN)/python benchmarks/gpu_check.py; else PYTHONPATH=. python3 benchmarks/gpu_check.py; fi
