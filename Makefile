# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3

.PHONY: install install-dev demo test lint bench-api

# CPU torch first where none is installed (an unpinned torch would pull several GB of CUDA wheels);
# a machine that already has torch (a GPU build, say) keeps it.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e .

install-dev: install
	$(PYTHON) -m pip install -e '.[dev]'
	cd tests/e2e/node && npm ci --no-audit --no-fund

demo: install
	$(PYTHON) -m cli demo

test: install-dev
	$(PYTHON) -m pytest -q

lint: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench-api: install-dev
	$(PYTHON) bench/api.py

.PHONY: bench-methods
bench-methods: install-dev
	$(PYTHON) bench/methods_table.py

.PHONY: bench-throughput bench-qlora bench-serving
# These take the model from FTJOBS_DATA_DIR (pulled there if missing) unless given ARGS="--model-dir DIR".
bench-throughput: install-dev
	$(PYTHON) bench/train_throughput.py $(ARGS)

bench-qlora: install-dev
	$(PYTHON) bench/qlora_memory.py $(ARGS)

bench-serving: install-dev
	$(PYTHON) bench/adapter_serving.py $(ARGS)
