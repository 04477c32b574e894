# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
# Exact versions of everything but torch (constraints.txt says how it is made).
PIP_INSTALL = $(PYTHON) -m pip install -c constraints.txt

.PHONY: install install-dev constraints demo test lint bench-api

# CPU torch first where none is installed (an unpinned torch would pull several GB of CUDA wheels);
# a machine that already has torch (a GPU build, say) keeps it.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PIP_INSTALL) -e .

install-dev: install
	$(PIP_INSTALL) -e '.[dev]'
	cd tests/e2e/node && npm ci --no-audit --no-fund

# A fresh resolve of pyproject's dependencies in a scratch virtualenv, frozen into constraints.txt.
constraints:
	rm -rf build/constraints-venv && $(PYTHON) -m venv build/constraints-venv
	build/constraints-venv/bin/pip install torch==2.13.0
	build/constraints-venv/bin/pip install -e '.[dev]'
	{ grep '^#' constraints.txt; build/constraints-venv/bin/pip freeze --exclude-editable \
		| grep -viE '^(torch|triton|nvidia-)'; } > build/constraints.txt && mv build/constraints.txt constraints.txt
	rm -rf build/constraints-venv

demo: install
	$(PYTHON) -m cli demo

test: install-dev
	$(PYTHON) -m pytest -q

# Style and types; the type checker is told which interpreter's packages to read (a venv's, say), and not to
# ask PyPI whether a newer pyright exists (its version is pinned in the dev extras).
lint: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(PYTHON) -m pyright --pythonpath "$$($(PYTHON) -c 'import sys; print(sys.executable)')"

bench-api: install-dev
	$(PYTHON) bench/api.py

.PHONY: bench-methods
bench-methods: install-dev
	$(PYTHON) bench/methods_table.py

.PHONY: bench-scheduler
bench-scheduler: install-dev
	$(PYTHON) bench/scheduler.py $(ARGS)

.PHONY: bench-throughput bench-qlora bench-serving bench-serving-load bench-distributed
# These take the model from FTJOBS_DATA_DIR (pulled there if missing) unless given ARGS="--model-dir DIR".
bench-throughput: install-dev
	$(PYTHON) bench/train_throughput.py $(ARGS)

bench-distributed: install-dev
	$(PYTHON) bench/distributed.py $(ARGS)

bench-qlora: install-dev
	$(PYTHON) bench/qlora_memory.py $(ARGS)

bench-serving: install-dev
	$(PYTHON) bench/adapter_serving.py $(ARGS)

bench-serving-load: install-dev
	$(PYTHON) bench/serving_load.py $(ARGS)

.PHONY: bench-store
# Upload and download of a 500 MB file through the S3 store (a SeaweedFS it starts) beside `cp`.
bench-store: install-dev
	$(PYTHON) bench/store_throughput.py $(ARGS)
