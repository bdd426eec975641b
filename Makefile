# Batch Normalization, Executable — every target creates .venv by itself.
#   make book     build the HTML book into _build/html (no network needed once installed)
#   make test     unit/property/parity tests, every notebook by nbval (strict), book build with -W
#   make execute  re-execute every notebook in place (stored outputs = what nbval recomputes)
#   make lint     compile-check the package and tests
#   make clean    remove build products (keeps .venv)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# TensorFlow logs to stderr at import unless this is set before Python starts.
export TF_CPP_MIN_LOG_LEVEL := 3
# Deterministic kernels and hashing for every process started from here.
export PYTHONHASHSEED := 0
export TF_DETERMINISTIC_OPS := 1
# No progress bars in stored notebook outputs (readers running Jupyter get them).
export COMPANION_NO_PROGRESS := 1

.PHONY: book test execute lint clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,book]"
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

test: $(STAMP)
	$(PY) -m pytest
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

execute: $(STAMP)
	$(PY) tests/execute_notebooks.py book

lint: $(STAMP)
	$(PY) -m compileall -q companion tests

clean:
	rm -rf _build .pytest_cache .hypothesis .coverage htmlcov
